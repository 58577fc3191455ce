// crm-events-client.js: a small, dependency-free client for the crm-events stream.
//
// It shows the three things every consumer of GET /crm-events must get right:
//
//   connect  new EventSource("/crm-events?types=...") — one line of JSON per event, the SSE
//            id is the event's position (a Redis stream id, "<ms>-<seq>").
//   resume   keep the last id. The browser's own reconnect sends it as Last-Event-ID; when
//            *you* open a new EventSource (page reload, filter change, after the browser gave
//            up on an error status) pass it as ?last_event_id=<id>. The server sends exactly
//            the events after it: nothing missed, nothing twice.
//   reset    if that position can no longer be resumed without a gap (trimmed away, the
//            stream was recreated, an id from elsewhere), the stream starts with
//            `event: reset`. EventSource only delivers named events to a listener for that
//            name, so listen for "reset" — otherwise you silently believe you have a
//            gap-free history. Its id is the new position; the data says what happened.
//
// Usage (browser, as an ES module; see index.html):
//
//   import { connectCrmEvents } from "./crm-events-client.js";
//   const client = connectCrmEvents({
//     types: ["DealWon", "DealLost"],          // optional: server-side filter
//     storage: window.sessionStorage,          // optional: resume across reloads
//     onEvent: (envelope, id) => console.log(id, envelope.type, envelope.event),
//     onReset: (info) => console.warn("reset:", info.reason, info.message),
//     onState: (state, detail) => console.log(state, detail),
//   });
//   client.setTypes(["TicketOpened"]);         // reconnects with the new filter, resuming
//   client.close();
//
// Node: pass an EventSource implementation as `EventSource` (Node 22+ has one behind
// --experimental-eventsource) and an absolute `url`; tail.mjs shows the same protocol with
// plain fetch() for Node 20.

const ID_RE = /^(\d+)-(\d+)$/;

/** Compare two stream ids ("<ms>-<seq>"): negative, zero or positive. */
export function compareIds(a, b) {
  const x = ID_RE.exec(a);
  const y = ID_RE.exec(b);
  if (!x || !y) return 0;
  const ms = BigInt(x[1]) - BigInt(y[1]);
  if (ms !== 0n) return ms < 0n ? -1 : 1;
  const seq = BigInt(x[2]) - BigInt(y[2]);
  return seq === 0n ? 0 : seq < 0n ? -1 : 1;
}

/**
 * Open the stream and keep it open. Returns { close(), setTypes(types), get lastId() }.
 *
 * Options:
 *   url          the stream's URL (default: "/crm-events" of this page's origin)
 *   types        array of event types, or null for all
 *   lastEventId  where to start (default: the stored id, else live from now)
 *   storage      an object with getItem/setItem (sessionStorage, localStorage) to keep the id
 *   storageKey   default "crm-events:last-id"
 *   onEvent(envelope, id)   envelope = {type, key, partition, offset, timestamp_ms, event}
 *   onReset(info)           info = {reason, requested, resume_from, oldest_available, message}
 *   onState(state, detail)  "connecting" | "live" | "reconnecting" | "closed"
 *   EventSource  the constructor to use (default: globalThis.EventSource)
 */
export function connectCrmEvents(options = {}) {
  const {
    url = "/crm-events",
    storage = null,
    storageKey = "crm-events:last-id",
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
  let lastId = options.lastEventId ?? storage?.getItem(storageKey) ?? null;
  let source = null;
  let attempts = 0;
  let retryTimer = null;
  let closed = false;

  function remember(id) {
    lastId = id;
    try {
      storage?.setItem(storageKey, id);
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
    if (lastId) target.searchParams.set("last_event_id", lastId);
    onState("connecting", { url: target.toString() });
    const es = new EventSourceImpl(target.toString());
    source = es;

    es.onopen = () => {
      attempts = 0;
      onState("live", { lastId });
    };

    // Every data event: no `event:` name, so onmessage receives it.
    es.onmessage = (message) => {
      const id = message.lastEventId;
      // Defensive: never hand the same event to the application twice.
      if (id && lastId && compareIds(id, lastId) <= 0) return;
      let envelope;
      try {
        envelope = JSON.parse(message.data);
      } catch {
        return;
      }
      if (id) remember(id);
      onEvent(envelope, id);
    };

    // The in-band notice. Its id is the position from which the stream is complete again;
    // it replaces ours (it may be lower, if the stream was recreated).
    es.addEventListener("reset", (message) => {
      let info = {};
      try {
        info = JSON.parse(message.data);
      } catch {
        // still a reset
      }
      const boundary = message.lastEventId || info.resume_from;
      if (boundary) remember(boundary);
      onReset(info);
    });

    es.onerror = () => {
      attempts += 1;
      if (es.readyState === EventSourceImpl.CLOSED) {
        // The browser gave up (an HTTP error such as 502/503/401, or a wrong content type).
        // Retry ourselves, with backoff, from the last id.
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
    get lastId() {
      return lastId;
    },
    setTypes(next) {
      types = next && next.length ? [...next] : null;
      open();
    },
    close() {
      closed = true;
      clearTimeout(retryTimer);
      source?.close();
      onState("closed", { lastId });
    },
  };
}
