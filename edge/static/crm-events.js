// CRM events Command Center: an operator's live view of GET /crm-events (Server-Sent Events).
//
// Plain JavaScript, no build step, no dependencies; it talks only to its own origin.
//
// Positions are cursors: every event's SSE id, a history item's `cursor` and a page's
// `next_after` are opaque strings that only the edge decodes. This page keeps the newest
// one and passes it back unchanged; it never parses or compares them. Each event's
// envelope says its Kafka `partition` and `offset`, which is what the page checks.
//
//   1. backfill: GET /crm-events/history?n=100[&types=] fills the table (oldest to newest);
//   2. stream:   new EventSource("/crm-events?last_event_id=<the page's next_after>[&types=]"),
//                so the stream continues exactly after the backfill: no gap, no duplicate;
//   3. the browser reconnects a dropped stream by itself, sending Last-Event-ID; when it gives
//      up (an error status such as 502/503 from the load balancer) this page reconnects with
//      ?last_event_id= and a backoff. A filter change or "resume" opens a new EventSource the
//      same way. Per partition, an event at or below the newest offset shown is dropped and
//      counted, so an event is never shown twice;
//   4. `event: reset` (some partitions could not be resumed without a gap) shows a notice
//      naming those partitions and moves the position to the reset's id, from which the
//      stream is complete again;
//   5. the cursor is kept in sessionStorage: a reload backfills what happened since with
//      GET /crm-events/history?after=<cursor>, then streams after that page
//      (?last_event_id=<cursor> in the page's URL does the same once, e.g. from a bookmark).
"use strict";

(() => {
  const HISTORY_N = 100;
  const MAX_ROWS = 200;
  const SPARK_SECONDS = 60;
  const SPARK_MIN_SECONDS = 10;
  const RATE_WINDOW_S = 5;
  const LOG_MAX = 40;
  const STORE_KEY = "crm-events:cursor";
  const BACKOFF_BASE_MS = 1000;
  const BACKOFF_MAX_MS = 15000;
  const MAX_TYPES = 64;
  // Only a sanity bound (the edge caps cursors at 16384 characters); never parsed.
  const CURSOR_RE = /^[\x21-\x7e]{1,16384}$/;
  const TYPE_RE = /^[A-Za-z0-9_.:-]{1,128}$/;
  const AGGREGATE_FIELDS = ["AggregateId", "aggregateId", "aggregate_id"];
  const TENANT_FIELDS = ["TenantId", "tenantId", "tenant_id"];
  const PAYLOAD_FIELDS = ["Data", "data", "Payload", "payload"];
  const META_FIELDS = new Set([
    "Type", "type", "eventType", "Ts", "ts", "Timestamp", "timestamp", "EventId", "eventId",
    "id", ...AGGREGATE_FIELDS, ...TENANT_FIELDS,
  ]);

  // The API lives at the root of this origin; the page is /ops/crm-events.
  const API = new URL("../", window.location.href);
  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"),
    statusText: $("status-text"),
    pause: $("pause"),
    pauseLabel: $("pause-label"),
    resetNotice: $("reset-notice"),
    resetText: $("reset-text"),
    resetDetails: $("reset-details"),
    resetDismiss: $("reset-dismiss"),
    total: $("total"),
    totalNote: $("total-note"),
    rate: $("rate"),
    peak: $("peak"),
    sparkArea: $("spark-area"),
    sparkLine: $("spark-line"),
    sparkFrom: $("spark-from"),
    authNotice: $("auth-notice"),
    authText: $("auth-text"),
    authCookieName: $("auth-cookie-name"),
    protocol: $("protocol"),
    reconnects: $("reconnects"),
    duplicates: $("duplicates"),
    cursor: $("cursor"),
    filterForm: $("filter-form"),
    typesInput: $("types-input"),
    knownTypes: $("known-types"),
    clearFilter: $("clear-filter"),
    filterState: $("filter-state"),
    body: $("events-body"),
    eventsEmpty: $("events-empty"),
    typeCounts: $("type-counts"),
    typesEmpty: $("types-empty"),
    connLog: $("conn-log"),
  };

  const state = {
    types: null, // null = all types, else a sorted array
    cursor: null, // position: the newest event's id, or a reset's (opaque: never parsed)
    seen: new Map(), // partition -> newest offset shown (the duplicate check)
    es: null,
    streamGen: 0, // callbacks of a replaced EventSource are ignored
    startGen: 0, // a newer start (filter change) supersedes a pending backfill
    paused: false,
    attempts: 0, // failed connection attempts since the stream was last open
    lost: false, // the stream dropped and has not been open since
    reconnects: 0,
    duplicates: 0,
    retryTimer: 0,
    persistTimer: 0,
    resetPending: false, // a reset notice is shown and not dismissed
    conn: "connecting",
    total: 0,
    fromHistory: 0,
    live: 0,
    counts: new Map(), // type -> count under the current filter
    known: new Set(), // every type seen since the page loaded
    perSecond: new Map(), // epoch second -> events arrived on the stream
    pending: [], // rows not yet in the DOM, oldest first
    frame: 0,
    frameTimer: 0,
    typeItems: new Map(), // type -> {li, button, count, bar}
    openedAt: Math.floor(Date.now() / 1000),
    backfillAfterAuth: 0, // the backfill was refused (401/403): redo it once signed in
  };

  // --- positions ---------------------------------------------------------------------------

  function isCursor(text) {
    return typeof text === "string" && CURSOR_RE.test(text);
  }

  function setPosition(cursor) {
    state.cursor = isCursor(cursor) ? cursor : null;
    persistSoon();
  }

  // Per partition, from the envelope: offsets grow within a partition (with holes, so only
  // "not newer" is a finding) and nothing orders partitions against each other.
  function isDuplicate(envelope) {
    const partition = envelope.partition;
    const offset = envelope.offset;
    if (!Number.isSafeInteger(partition) || !Number.isSafeInteger(offset)) return false;
    const newest = state.seen.get(partition);
    if (newest !== undefined && offset <= newest) return true;
    state.seen.set(partition, offset);
    return false;
  }

  // --- persistence (sessionStorage: per tab, survives a reload) ----------------------------

  function persistNow() {
    clearTimeout(state.persistTimer);
    state.persistTimer = 0;
    try {
      if (state.cursor) sessionStorage.setItem(STORE_KEY, state.cursor);
      else sessionStorage.removeItem(STORE_KEY);
    } catch {
      // Storage disabled: a reload then starts from the newest history, as a new tab does.
    }
  }

  function persistSoon() {
    if (!state.persistTimer) state.persistTimer = setTimeout(persistNow, 250);
  }

  function savedPosition() {
    const params = new URLSearchParams(window.location.search);
    const fromUrl = params.get("last_event_id");
    if (fromUrl !== null) {
      // Used once: later reloads continue from sessionStorage.
      params.delete("last_event_id");
      replaceQuery(params);
      if (isCursor(fromUrl)) return fromUrl;
    }
    try {
      const stored = sessionStorage.getItem(STORE_KEY);
      return isCursor(stored) ? stored : null;
    } catch {
      return null;
    }
  }

  function replaceQuery(params) {
    const query = params.toString();
    const url = window.location.pathname + (query ? `?${query}` : "") + window.location.hash;
    window.history.replaceState(null, "", url);
  }

  // --- connection state ----------------------------------------------------------------------

  const timeFormat = new Intl.DateTimeFormat(undefined, {
    hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
  });
  const eventTimeFormat = new Intl.DateTimeFormat(undefined, {
    hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 3,
    hourCycle: "h23",
  });

  function log(kind, text) {
    const li = document.createElement("li");
    li.dataset.state = kind;
    const time = document.createElement("time");
    const now = new Date();
    time.dateTime = now.toISOString();
    time.textContent = timeFormat.format(now);
    const span = document.createElement("span");
    span.textContent = text;
    li.append(time, span);
    el.connLog.prepend(li);
    while (el.connLog.children.length > LOG_MAX) el.connLog.lastElementChild.remove();
  }

  function setConn(conn, logText) {
    state.conn = conn;
    showStatus();
    if (logText) log(conn, logText);
  }

  function showStatus() {
    let shown = state.conn;
    let text;
    switch (state.conn) {
      case "live":
        if (state.resetPending) {
          shown = "reset";
          text = "Reset received · live";
        } else {
          text = "Live";
        }
        break;
      case "reconnecting":
        text = `Reconnecting (attempt ${state.attempts})`;
        break;
      case "paused":
        text = "Paused";
        break;
      default:
        text = "Connecting…";
    }
    el.status.dataset.state = shown;
    el.status.dataset.attempts = String(state.attempts);
    el.statusText.textContent = text;
    const mark = { live: "●", reset: "▲", reconnecting: "↻", paused: "❚❚" }[shown] || "…";
    document.title = `${mark} ${text} · CRM events`;
  }

  // --- the stream ------------------------------------------------------------------------------

  function streamUrl() {
    const url = new URL("crm-events", API);
    if (state.types) url.searchParams.set("types", state.types.join(","));
    if (state.cursor) url.searchParams.set("last_event_id", state.cursor);
    return url;
  }

  function closeStream() {
    clearTimeout(state.retryTimer);
    state.retryTimer = 0;
    state.streamGen += 1;
    if (state.es) {
      state.es.close();
      state.es = null;
    }
  }

  function openStream() {
    closeStream();
    const gen = state.streamGen;
    let es;
    try {
      es = new EventSource(streamUrl());
    } catch (err) {
      state.attempts += 1;
      setConn("reconnecting", `Cannot open the stream: ${err.message}`);
      scheduleReconnect();
      return;
    }
    state.es = es;
    es.onopen = () => {
      if (gen !== state.streamGen) return;
      const after = state.attempts;
      state.attempts = 0;
      showAuth(null);
      if (state.backfillAfterAuth === 1 && state.total === 0) {
        // Signed in now: load the history that was refused, then stream after it.
        state.backfillAfterAuth = 2;
        start(state.cursor);
        return;
      }
      if (state.lost) {
        state.reconnects += 1;
        state.lost = false;
        setConn("live", `Live again after ${after} attempt${after === 1 ? "" : "s"}`);
      } else {
        setConn("live", state.cursor ? `Live, after ${shortCursor(state.cursor)}` : "Live");
      }
      markDirty();
    };
    es.onmessage = (ev) => {
      if (gen === state.streamGen) onEvent(ev.lastEventId, ev.data);
    };
    es.addEventListener("reset", (ev) => {
      if (gen === state.streamGen) onReset(ev);
    });
    es.onerror = () => {
      if (gen !== state.streamGen) return;
      state.attempts += 1;
      state.lost = true;
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (an error status or a wrong content type): retry ourselves.
        state.es = null;
        setConn("reconnecting", `Stream refused (attempt ${state.attempts}); retrying`);
        scheduleReconnect();
        diagnose();
      } else {
        // CONNECTING: the browser retries after the server's retry: hint, with Last-Event-ID.
        setConn(
          "reconnecting",
          state.attempts === 1 ? "Stream lost; reconnecting" : `Attempt ${state.attempts} failed`,
        );
      }
    };
  }

  function scheduleReconnect() {
    clearTimeout(state.retryTimer);
    const exp = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** Math.min(state.attempts - 1, 6));
    const delay = Math.round(exp * (0.5 + Math.random() / 2));
    state.retryTimer = setTimeout(() => {
      if (!state.paused) openStream();
    }, delay);
  }

  function onEvent(id, data) {
    let envelope;
    try {
      envelope = JSON.parse(data);
    } catch {
      return;
    }
    if (!envelope || typeof envelope !== "object") return;
    // The id moves on even for a dropped event: it covers everything sent before it.
    if (id) setPosition(id);
    if (isDuplicate(envelope)) {
      state.duplicates += 1;
      markDirty();
      return;
    }
    const second = Math.floor(Date.now() / 1000);
    state.perSecond.set(second, (state.perSecond.get(second) || 0) + 1);
    state.live += 1;
    addEvent(id, envelope, true);
  }

  function resetPartitions(info) {
    return Array.isArray(info.partitions)
      ? info.partitions.filter((p) => p && Number.isSafeInteger(p.partition))
      : [];
  }

  function onReset(ev) {
    let info = {};
    try {
      info = JSON.parse(ev.data) || {};
    } catch {
      // Still a reset; show what there is.
    }
    // The reset's id is the cursor from which the stream is complete again. It replaces the
    // position: in a recreated topic offsets start again, so the partitions it names forget
    // the offsets shown (all of them when the topic or the format changed).
    if (isCursor(ev.lastEventId)) setPosition(ev.lastEventId);
    const partitions = resetPartitions(info);
    if (info.reason === "topic_changed" || info.reason === "old_format" || !partitions.length) {
      state.seen.clear();
    } else {
      for (const p of partitions) state.seen.delete(p.partition);
    }
    state.resetPending = true;
    showReset(info, partitions);
    const names = partitions.map((p) => `p${p.partition}`).join(", ") || "all partitions";
    log("reset", `Reset received (${info.reason || "?"}): ${names} continue from the oldest available`);
    showStatus();
  }

  function position(value) {
    return Number.isSafeInteger(value) ? `offset ${value.toLocaleString()}` : "none";
  }

  function showReset(info, partitions) {
    el.resetText.textContent = info.message || "The stream could not continue without a gap.";
    el.resetDetails.replaceChildren();
    const rows = [["Reason", info.reason]];
    for (const p of partitions) {
      // Positions are Kafka's "next offset": where the partition was, and where it goes on.
      rows.push([
        `Partition ${p.partition}`,
        `${p.reason || info.reason || "?"}: asked from ${position(p.requested)}, ` +
          `continues from ${position(p.oldest_available)}`,
      ]);
    }
    for (const [label, value] of rows) {
      if (value === undefined || value === null) continue;
      const div = document.createElement("div");
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.textContent = String(value);
      div.append(dt, dd);
      el.resetDetails.append(div);
    }
    el.resetNotice.hidden = false;
    el.resetNotice.dataset.reason = info.reason || "";
    el.resetNotice.dataset.partitions = partitions.map((p) => p.partition).join(",");
  }

  function shortCursor(cursor) {
    return cursor.length > 24 ? `${cursor.slice(0, 21)}…` : cursor;
  }

  // --- backfill, then the stream ---------------------------------------------------------------

  async function fetchHistory(query) {
    const url = new URL("crm-events/history", API);
    for (const [name, value] of Object.entries(query)) {
      if (value !== null && value !== undefined) url.searchParams.set(name, String(value));
    }
    const res = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" } });
    let body = null;
    try {
      body = await res.json();
    } catch {
      // not JSON: reported by status below
    }
    if (!res.ok) {
      const why = body && body.message ? `${body.error}: ${body.message}` : `HTTP ${res.status}`;
      const err = new Error(why);
      err.status = res.status;
      throw err;
    }
    return body;
  }

  // EventSource does not say why it was refused; the history endpoint answers the same
  // authentication and the same cursor check, and tells, as JSON.
  async function diagnose() {
    try {
      await fetchHistory({
        n: 1,
        after: state.cursor,
        types: state.types ? state.types.join(",") : null,
      });
      showAuth(null);
    } catch (err) {
      showAuth(err.status === 401 || err.status === 403 ? err : null);
      if (err.status === 400 && state.cursor) {
        // Retrying with a position the edge refuses would fail forever: go live from now.
        log("reset", `Position refused (${err.message}); continuing from now`);
        setPosition(null);
      }
    }
  }

  function showAuth(err) {
    el.authNotice.hidden = !err;
    if (err) {
      const what = err.status === 401 ? "Not signed in" : "Not allowed";
      el.authText.textContent = `${what} (${err.status}): ${err.message}.`;
    }
  }

  // Backfill, then stream from the backfill's `next_after`. With a saved cursor (reload,
  // bookmark), the events after it come first (history `after=`), so a reload misses
  // nothing; the newest page before it fills the table when the catch-up is short. The
  // cursors are never compared here: the envelope's partition and offset tell the pages'
  // overlap apart.
  async function start(saved) {
    const gen = ++state.startGen;
    closeStream();
    state.attempts = 0;
    state.lost = false;
    setConn("connecting", "Loading history");
    const types = state.types ? state.types.join(",") : null;
    let shown = [];
    let anchor = null;
    let reset = null;
    let historyOk = true;
    try {
      // The newest page first: all of it is older than the catch-up asked for next.
      const newest = await fetchHistory({ n: HISTORY_N, types });
      const recent = Array.isArray(newest.items) ? newest.items : [];
      anchor = isCursor(newest.next_after) ? newest.next_after : null;
      shown = recent;
      if (saved) {
        let since = null;
        try {
          since = await fetchHistory({ n: HISTORY_N, after: saved, types });
        } catch (err) {
          if (err.status !== 400) throw err;
          // Not a cursor of this API (an edited link): start from the newest page instead.
          log("connecting", `Saved position refused (${err.message}); starting from now`);
        }
        if (since) {
          const after = Array.isArray(since.items) ? since.items : [];
          reset = since.reset && typeof since.reset === "object" ? since.reset : null;
          anchor = isCursor(since.next_after) ? since.next_after : saved;
          const key = (item) => `${item.partition}:${item.offset}`;
          if (after.length >= HISTORY_N) {
            // More happened since than one page holds: show it from the saved position on,
            // in order, and let the stream replay the rest.
            shown = after;
            log("connecting", `Catching up from ${shortCursor(saved)}`);
          } else {
            const fresh = new Set(after.map(key));
            shown = [...recent.filter((item) => !fresh.has(key(item))), ...after];
            log("connecting", `Resuming after ${shortCursor(saved)}`);
          }
        }
      }
      if (!anchor && types && shown.length === 0) {
        // None of these types recently and no cursor given: anchor at the newest of all.
        const latest = await fetchHistory({ n: 1 });
        anchor = isCursor(latest.next_after) ? latest.next_after : null;
      }
    } catch (err) {
      historyOk = false;
      shown = [];
      anchor = saved;
      log("connecting", `History unavailable (${err.message})`);
      if (err.status === 401 || err.status === 403) {
        showAuth(err);
        if (state.backfillAfterAuth === 0) state.backfillAfterAuth = 1;
      }
    }
    if (gen !== state.startGen) return;
    let added = 0;
    const listed = new Set();
    for (const item of shown) {
      if (!item || typeof item !== "object") continue;
      const { cursor, ...envelope } = item;
      // A page is merged by Kafka timestamp, which a producer may set out of offset order:
      // the page is deduplicated by (partition, offset), the stream after it by the newest.
      const key = `${envelope.partition}:${envelope.offset}`;
      if (listed.has(key)) continue;
      listed.add(key);
      if (Number.isSafeInteger(envelope.partition) && Number.isSafeInteger(envelope.offset)) {
        const newest = state.seen.get(envelope.partition);
        if (newest === undefined || envelope.offset > newest) {
          state.seen.set(envelope.partition, envelope.offset);
        }
      }
      state.fromHistory += 1;
      added += 1;
      addEvent(cursor, envelope, false);
    }
    if (added) log("connecting", `Backfilled ${added} from history`);
    if (reset) {
      state.resetPending = true;
      const partitions = resetPartitions(reset);
      showReset(reset, partitions);
      log("reset", `Reset in the history (${reset.reason || "?"})`);
    }
    if (historyOk && !anchor) log("connecting", "No position from the history: live from now");
    setPosition(anchor);
    if (!state.paused) openStream();
    else setConn("paused");
    markDirty();
  }

  // --- events -> rows --------------------------------------------------------------------------

  function pick(obj, names) {
    if (!obj || typeof obj !== "object") return undefined;
    for (const name of names) {
      const value = obj[name];
      if (value !== undefined && value !== null && value !== "") return value;
    }
    return undefined;
  }

  function scalar(value) {
    if (value === null) return "null";
    if (typeof value === "object") return null;
    const text = String(value);
    return text.length > 48 ? `${text.slice(0, 47)}…` : text;
  }

  function details(event) {
    if (!event || typeof event !== "object") return [];
    const payload = pick(event, PAYLOAD_FIELDS);
    const source = payload && typeof payload === "object" ? payload : event;
    const out = [];
    for (const [name, value] of Object.entries(source)) {
      if (source === event && (META_FIELDS.has(name) || PAYLOAD_FIELDS.includes(name))) continue;
      if (value && typeof value === "object" && !Array.isArray(value)) {
        for (const [inner, v] of Object.entries(value)) {
          const text = scalar(v);
          if (text !== null) out.push([`${name}.${inner}`, text]);
          if (out.length >= 4) return out;
        }
        continue;
      }
      const text = scalar(value);
      if (text !== null) out.push([name, text]);
      if (out.length >= 4) break;
    }
    return out;
  }

  function hue(type) {
    // Outcomes read at a glance; every other type gets a stable colour from its name.
    if (/(Lost|Failed|Deleted|Rejected|Cancell?ed|Error)$/.test(type)) return 4;
    if (/(Won|Resolved|Completed|Succeeded|Paid)$/.test(type)) return 145;
    let h = 2166136261;
    for (let i = 0; i < type.length; i += 1) {
      h ^= type.charCodeAt(i);
      h = Math.imul(h, 16777619);
    }
    return Math.abs(h) % 360;
  }

  function addEvent(id, envelope, live) {
    const type = typeof envelope.type === "string" ? envelope.type : "?";
    state.total += 1;
    state.counts.set(type, (state.counts.get(type) || 0) + 1);
    state.known.add(type);
    state.pending.push({ id, envelope, type, live });
    if (state.pending.length > 2 * MAX_ROWS) state.pending.splice(0, state.pending.length - MAX_ROWS);
    markDirty();
  }

  function cell(className, text) {
    const td = document.createElement("td");
    td.className = className;
    if (text !== undefined) td.textContent = text;
    return td;
  }

  function makeRow({ id, envelope, type, live }) {
    const event = envelope.event && typeof envelope.event === "object" ? envelope.event : {};
    const tr = document.createElement("tr");
    if (id) tr.dataset.id = id;
    tr.dataset.partition = String(envelope.partition ?? "");
    tr.dataset.offset = String(envelope.offset ?? "");
    tr.dataset.type = type;
    if (envelope.key !== undefined && envelope.key !== null) tr.dataset.key = String(envelope.key);
    if (live) tr.className = "fresh";

    const ts = Number(envelope.timestamp_ms);
    const time = cell("time");
    if (Number.isFinite(ts) && ts > 0) {
      const date = new Date(ts);
      const t = document.createElement("time");
      t.dateTime = date.toISOString();
      t.title = date.toISOString();
      t.textContent = eventTimeFormat.format(date);
      time.append(t);
    } else {
      time.textContent = "—";
    }

    const typeCell = cell("type");
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = type;
    badge.style.setProperty("--hue", String(hue(type)));
    typeCell.append(badge);

    const aggregate = pick(event, AGGREGATE_FIELDS) ?? envelope.key ?? "—";
    const tenant = pick(event, TENANT_FIELDS) ?? "—";

    const detailCell = cell("details");
    const parts = details(event);
    parts.forEach(([name, value], i) => {
      if (i) detailCell.append(" · ");
      const k = document.createElement("span");
      k.className = "k";
      k.textContent = `${name} `;
      detailCell.append(k, value);
    });
    detailCell.title = parts.map(([name, value]) => `${name}: ${value}`).join("\n");

    // Partition and offset say where the event is; the cursor (the SSE id) is opaque.
    const idCell = cell("id", `p${envelope.partition ?? "?"} · ${envelope.offset ?? "?"}`);
    if (id) idCell.title = `cursor ${id}`;

    tr.append(time, typeCell, cell("agg", String(aggregate)), cell("tenant", String(tenant)),
      detailCell, idCell);
    return tr;
  }

  // --- rendering (batched per animation frame; a timer covers background tabs) --------------

  function markDirty() {
    if (!state.frame) state.frame = requestAnimationFrame(render);
    if (!state.frameTimer) state.frameTimer = setTimeout(render, 500);
  }

  function render() {
    cancelAnimationFrame(state.frame);
    clearTimeout(state.frameTimer);
    state.frame = 0;
    state.frameTimer = 0;

    if (state.pending.length) {
      const batch = state.pending.slice(-MAX_ROWS);
      state.pending = [];
      const fragment = document.createDocumentFragment();
      for (let i = batch.length - 1; i >= 0; i -= 1) fragment.append(makeRow(batch[i]));
      el.body.prepend(fragment);
      while (el.body.rows.length > MAX_ROWS) el.body.lastElementChild.remove();
    }
    el.eventsEmpty.hidden = el.body.rows.length > 0;

    el.total.textContent = state.total.toLocaleString();
    el.totalNote.textContent = state.total
      ? `${state.live.toLocaleString()} live · ${state.fromHistory.toLocaleString()} from history`
      : "none yet";
    el.cursor.textContent = state.cursor || "—";
    el.cursor.title = state.cursor ? `${state.cursor}\n(opaque: only the edge decodes it)` : "";
    el.duplicates.textContent = state.duplicates.toLocaleString();
    el.reconnects.textContent = state.reconnects.toLocaleString();
    renderTypes();
  }

  function renderTypes() {
    const selected = new Set(state.types || []);
    const types = [...state.known].sort((a, b) => a.localeCompare(b));
    const max = Math.max(1, ...state.counts.values());
    for (const type of types) {
      let item = state.typeItems.get(type);
      if (!item) {
        item = makeTypeItem(type);
        state.typeItems.set(type, item);
        const option = document.createElement("option");
        option.value = type;
        el.knownTypes.append(option);
      }
      const count = state.counts.get(type) || 0;
      item.count.textContent = count.toLocaleString();
      item.bar.style.width = `${(100 * count) / max}%`;
      item.button.setAttribute("aria-pressed", String(selected.has(type)));
      item.li.dataset.count = String(count);
    }
    // Alphabetical and stable: buttons never move under the keyboard focus.
    const order = types.map((t) => state.typeItems.get(t).li);
    if (order.some((li, i) => el.typeCounts.children[i] !== li)) el.typeCounts.replaceChildren(...order);
    el.typesEmpty.hidden = types.length > 0;
  }

  function makeTypeItem(type) {
    const li = document.createElement("li");
    li.dataset.type = type;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "type-button";
    button.setAttribute("aria-pressed", "false");
    button.style.setProperty("--hue", String(hue(type)));
    const name = document.createElement("span");
    name.className = "type-name";
    name.textContent = type;
    const count = document.createElement("span");
    count.className = "type-count";
    const track = document.createElement("span");
    track.className = "type-bar";
    track.setAttribute("aria-hidden", "true");
    const bar = document.createElement("span");
    track.append(bar);
    button.append(name, count, track);
    button.title = `Show only ${type} (toggle)`;
    button.addEventListener("click", () => toggleType(type));
    li.append(button);
    return { li, button, count, bar };
  }

  // --- rate and sparkline (once a second) ---------------------------------------------------

  function tick() {
    const now = Math.floor(Date.now() / 1000);
    for (const second of state.perSecond.keys()) {
      if (second < now - SPARK_SECONDS - 1) state.perSecond.delete(second);
    }
    // Completed seconds only (the current one is still filling), and none from before the
    // page opened: it did not see them, so it draws no zeros for them.
    const span = Math.max(SPARK_MIN_SECONDS, Math.min(SPARK_SECONDS, now - state.openedAt));
    const values = [];
    for (let s = now - span; s < now; s += 1) values.push(state.perSecond.get(s) || 0);
    el.sparkFrom.textContent = `${span} s ago`;
    const peak = Math.max(0, ...values);
    const recent = values.slice(-RATE_WINDOW_S).reduce((a, b) => a + b, 0) / RATE_WINDOW_S;
    el.rate.textContent = recent.toFixed(1);
    el.peak.textContent = peak.toLocaleString();

    const width = 600;
    const top = 6;
    const bottom = 62;
    const scale = Math.max(peak, 1);
    const step = width / (values.length - 1);
    const points = values.map((v, i) => [i * step, bottom - ((bottom - top) * v) / scale]);
    const line = points.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join("");
    el.sparkLine.setAttribute("d", line);
    el.sparkArea.setAttribute("d", `${line}L${width},${bottom + 1}L0,${bottom + 1}Z`);
  }

  // --- filter, pause, keyboard ---------------------------------------------------------------

  function parseTypes(text) {
    const items = [...new Set(String(text || "").split(/[\s,]+/).filter(Boolean))];
    const bad = items.filter((t) => !TYPE_RE.test(t));
    if (bad.length) return { error: `Not an event type: ${bad.join(", ")}` };
    if (items.length > MAX_TYPES) return { error: `At most ${MAX_TYPES} types` };
    return { types: items.length ? items.sort() : null };
  }

  function describeFilter() {
    // A filtered type is listed (and shown pressed) even before its first event.
    for (const type of state.types || []) state.known.add(type);
    el.filterState.textContent = state.types
      ? `Showing ${state.types.join(", ")}`
      : "Showing all types";
    el.typesInput.value = state.types ? state.types.join(",") : "";
  }

  function setFilter(types) {
    state.types = types;
    const params = new URLSearchParams(window.location.search);
    if (types) params.set("types", types.join(","));
    else params.delete("types");
    replaceQuery(params);
    describeFilter();
    // The table and counts now show the filtered stream: start over from its history.
    state.pending = [];
    el.body.replaceChildren();
    state.counts.clear();
    state.total = 0;
    state.fromHistory = 0;
    state.live = 0;
    state.cursor = null;
    state.seen.clear();
    log("connecting", types ? `Filter: ${types.join(", ")}` : "Filter cleared");
    markDirty();
    start(null);
  }

  function toggleType(type) {
    const current = new Set(state.types || []);
    if (current.has(type)) current.delete(type);
    else current.add(type);
    setFilter(current.size ? [...current].sort() : null);
  }

  function setPaused(paused) {
    state.paused = paused;
    el.pause.setAttribute("aria-pressed", String(paused));
    el.pauseLabel.textContent = paused ? "Resume" : "Pause";
    el.pause.querySelector(".button-icon").textContent = paused ? "▶" : "❚❚";
    if (paused) {
      closeStream();
      persistNow();
      setConn("paused", "Paused");
    } else {
      state.attempts = 0;
      state.lost = false;
      setConn("connecting", `Resuming after ${state.cursor ? shortCursor(state.cursor) : "now"}`);
      openStream();
    }
  }

  el.filterForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const parsed = parseTypes(el.typesInput.value);
    if (parsed.error) {
      el.typesInput.setCustomValidity(parsed.error);
      el.typesInput.reportValidity();
      el.filterState.textContent = parsed.error;
      return;
    }
    el.typesInput.setCustomValidity("");
    setFilter(parsed.types);
  });
  el.typesInput.addEventListener("input", () => el.typesInput.setCustomValidity(""));
  el.clearFilter.addEventListener("click", () => setFilter(null));
  el.pause.addEventListener("click", () => setPaused(!state.paused));
  el.resetDismiss.addEventListener("click", () => {
    el.resetNotice.hidden = true;
    state.resetPending = false;
    showStatus();
    el.pause.focus();
  });

  document.addEventListener("keydown", (ev) => {
    if (ev.defaultPrevented || ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const target = ev.target;
    if (target instanceof HTMLElement && target.closest("input, textarea, select, [contenteditable]")) {
      if (ev.key === "Escape" && target === el.typesInput) target.blur();
      return;
    }
    if (ev.key === "/") {
      ev.preventDefault();
      el.typesInput.focus();
      el.typesInput.select();
    } else if (ev.key === "p" || ev.key === "P") {
      ev.preventDefault();
      setPaused(!state.paused);
    }
  });

  window.addEventListener("pagehide", persistNow);
  window.addEventListener("online", () => {
    if (!state.paused && !state.es) openStream();
  });

  // --- sign-in from a link ---------------------------------------------------------------------

  // The edge names its auth cookie (CRM_EVENTS_AUTH_COOKIE) in a meta tag of this page.
  const COOKIE_NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;
  const cookieMeta = document.querySelector('meta[name="crm-events-auth-cookie"]');
  const authCookie =
    cookieMeta && COOKIE_NAME_RE.test(cookieMeta.content) ? cookieMeta.content : "crm_events_token";
  if (el.authCookieName) el.authCookieName.textContent = authCookie;

  // The token's expiry (its `exp` claim, epoch seconds), or null when it has none. Not a
  // verification: the edge checks the signature; this only bounds how long the cookie lives.
  function tokenExpiry(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const claims = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
      const exp = Number(claims.exp);
      return Number.isFinite(exp) ? exp : null;
    } catch {
      return null;
    }
  }

  // A link ending in #token=<jwt> (the local stack prints one) signs the page in: the token
  // becomes the auth cookie, which EventSource and fetch send on their own, and leaves the
  // address bar. A fragment never reaches a server or its logs. The cookie lives no longer
  // than the token, is sent only by this site's own pages (SameSite=Strict), and only over
  // TLS when the page came over TLS.
  function adoptTokenFromFragment() {
    const match = /^#token=([A-Za-z0-9_.-]+)$/.exec(window.location.hash);
    if (!match) return;
    history.replaceState(null, "", window.location.pathname + window.location.search);
    const exp = tokenExpiry(match[1]);
    const maxAge = exp === null ? null : Math.floor(exp - Date.now() / 1000);
    if (maxAge !== null && maxAge <= 0) {
      log("auth", "the token from the link has expired: not signed in");
      return;
    }
    const secure = window.location.protocol === "https:" ? "; Secure" : "";
    const lifetime = maxAge === null ? "" : `; Max-Age=${maxAge}`;
    document.cookie = `${authCookie}=${match[1]}; Path=/${lifetime}; SameSite=Strict${secure}`;
    log("auth", "signed in with the token from the link");
  }

  // --- go ----------------------------------------------------------------------------------------

  const nav = performance.getEntriesByType("navigation")[0];
  const protocolNames = { h2: "HTTP/2", h3: "HTTP/3", "http/1.1": "HTTP/1.1" };
  const hop = nav && nav.nextHopProtocol;
  el.protocol.textContent = hop
    ? `${protocolNames[hop] || hop}${window.location.protocol === "https:" ? " · TLS" : ""}`
    : "—";
  el.protocol.dataset.protocol = hop || "";

  adoptTokenFromFragment();
  const initial = parseTypes(new URLSearchParams(window.location.search).get("types"));
  state.types = initial.error ? null : initial.types;
  describeFilter();
  showStatus();
  tick();
  setInterval(tick, 1000);
  start(savedPosition());
})();
