// crm-events-client.js: a small, dependency-free client for the crm-events stream.
//
// It shows the three things every consumer of GET /crm-events must get right:
//
//   connect  new EventSource("/crm-events?types=...") — one line of JSON per event (the
//            envelope: type, key, partition, offset, timestamp_ms, event). The SSE id is a
//            *cursor*: an opaque string (e.g. "1.AAAAAQMBAgM") that stands for everything
//            the stream has sent so far. Keep it; never parse, compare or build one.
//   resume   keep the last cursor. The browser's own reconnect sends it as Last-Event-ID;
//            when *you* open a new EventSource (page reload, filter change, after the
//            browser gave up on an error status) pass it as ?last_event_id=<cursor>. The
//            server sends exactly the events after it: nothing missed, nothing twice.
//   reset    if some partitions can no longer be resumed without a gap (trimmed away, the
//            topic was recreated, a cursor of the old format), the stream starts with
//            `event: reset`. EventSource only delivers named events to a listener for that
//            name, so listen for "reset" — otherwise you silently believe you have a
//            gap-free history. Its id is the new cursor; the data names the partitions.
//
// Order: events of one Kafka partition (so of one record key) come in Kafka's order; there
// is no order across partitions. The duplicate check below is per partition, from the
// envelope's partition and offset (offsets grow within a partition but have holes, so a
// jump is not a gap).
//
// Usage (browser, as an ES module; see index.html):
//
//   import { connectCrmEvents } from "./crm-events-client.js";
//   const client = connectCrmEvents({
//     types: ["DealWon", "DealLost"],          // optional: server-side filter
//     storage: window.sessionStorage,          // optional: resume across reloads
//     onEvent: (envelope, cursor) => console.log(envelope.partition, envelope.offset, envelope.event),
//     onReset: (info) => console.warn("reset:", info.reason, info.partitions, info.message),
//     onState: (state, detail) => console.log(state, detail),
//   });
//   client.setTypes(["TicketOpened"]);         // reconnects with the new filter, resuming
//   client.close();
//
// Node: pass an EventSource implementation as `EventSource` (Node 22+ has one behind
// --experimental-eventsource) and an absolute `url`; tail.mjs shows the same protocol with
// plain fetch() for Node 20.

/**
 * Per-partition duplicate check from the envelopes: `seen(envelope)` is true when an event
 * of that partition at or above this offset was already handed over.
 */
export function partitionTracker() {
  const newest = new Map(); // partition -> newest offset handed over
  return {
    seen(envelope) {
      const { partition, offset } = envelope;
      if (!Number.isSafeInteger(partition) || !Number.isSafeInteger(offset)) return false;
      const last = newest.get(partition);
      if (last !== undefined && offset <= last) return true;
      newest.set(partition, offset);
      return false;
    },
    // After a reset: offsets of these partitions may start again (a recreated topic).
    forget(partitions) {
      if (partitions === null) newest.clear();
      else for (const p of partitions) newest.delete(p);
    },
  };
}

/**
 * Open the stream and keep it open. Returns { close(), setTypes(types), get cursor() }.
 *
 * Options:
 *   url          the stream's URL (default: "/crm-events" of this page's origin)
 *   types        array of event types, or null for all
 *   lastEventId  the cursor to start after (default: the stored one, else live from now)
 *   storage      an object with getItem/setItem (sessionStorage, localStorage) to keep it
 *   storageKey   default "crm-events:cursor"
 *   onEvent(envelope, cursor)  envelope = {type, key, partition, offset, timestamp_ms, event}
 *   onReset(info)   info = {reason, partitions: [{partition, requested, oldest_available,
 *                   reason}], message}
 *   onState(state, detail)  "connecting" | "live" | "reconnecting" | "closed"
 *   EventSource  the constructor to use (default: globalThis.EventSource)
 */
export function connectCrmEvents(options = {}) {
  const {
    url = "/crm-events",
    storage = null,
    storageKey = "crm-events:cursor",
    onEvent = () => {},
    onReset = () => {},
    onState = () => {},
    EventSource: EventSourceImpl = globalThis.EventSource,
  } = options;
  if (typeof EventSourceImpl !== "function") {
    throw new Error("no EventSource here: pass one as options.EventSource");
  }
  const base = typeof location !== "undefined" ? location.href : undefined;

  let types = options.types && options.types.length ? [...options.types] : null;
  let cursor = options.lastEventId || storage?.getItem(storageKey) || null;
  let source = null;
  let attempts = 0;
  let retryTimer = null;
  let closed = false;
  const partitions = partitionTracker();

  function remember(next) {
    cursor = next;
    try {
      storage?.setItem(storageKey, next);
    } catch {
      // storage full or disabled: resuming after a reload then starts from "now"
    }
  }

  function open() {
    clearTimeout(retryTimer);
    source?.close();
    const target = new URL(url, base);
    if (types) target.searchParams.set("types", types.join(","));
    // Only our own reconnects need this; the browser's carry Last-Event-ID themselves.
    if (cursor) target.searchParams.set("last_event_id", cursor);
    onState("connecting", { url: target.toString() });
    const es = new EventSourceImpl(target.toString());
    source = es;

    es.onopen = () => {
      attempts = 0;
      onState("live", { cursor });
    };

    // Every data event: no `event:` name, so onmessage receives it.
    es.onmessage = (message) => {
      let envelope;
      try {
        envelope = JSON.parse(message.data);
      } catch {
        return;
      }
      // The cursor moves on even for a dropped event: it covers everything before it.
      if (message.lastEventId) remember(message.lastEventId);
      // Defensive: never hand the same event to the application twice.
      if (partitions.seen(envelope)) return;
      onEvent(envelope, message.lastEventId);
    };

    // The in-band notice. Its id is the cursor from which the stream is complete again;
    // it replaces ours. The partitions it names continue from their oldest available event.
    es.addEventListener("reset", (message) => {
      let info = {};
      try {
        info = JSON.parse(message.data);
      } catch {
        // still a reset
      }
      if (message.lastEventId) remember(message.lastEventId);
      const named = Array.isArray(info.partitions) ? info.partitions.map((p) => p.partition) : [];
      const everything = info.reason === "topic_changed" || info.reason === "old_format";
      partitions.forget(everything || !named.length ? null : named);
      onReset(info);
    });

    es.onerror = () => {
      attempts += 1;
      if (es.readyState === EventSourceImpl.CLOSED) {
        // The browser gave up (an HTTP error such as 502/503/401, or a wrong content type).
        // Retry ourselves, with backoff, from the last cursor.
        const delay = Math.min(15000, 1000 * 2 ** Math.min(attempts - 1, 4));
        onState("reconnecting", { attempts, retryInMs: delay });
        retryTimer = setTimeout(() => closed || open(), delay * (0.5 + Math.random() / 2));
      } else {
        // CONNECTING: the browser reconnects by itself after the server's retry: hint,
        // sending Last-Event-ID.
        onState("reconnecting", { attempts });
      }
    };
  }

  open();
  return {
    get cursor() {
      return cursor;
    },
    setTypes(next) {
      types = next && next.length ? [...next] : null;
      open();
    },
    close() {
      closed = true;
      clearTimeout(retryTimer);
      source?.close();
      onState("closed", { cursor });
    },
  };
}
