// CRM events Command Center: an operator's live view of GET /crm-events (Server-Sent Events).
//
// Plain JavaScript, no build step; it talks only to its own origin. The protocol (history
// backfill, the stream, resume, reset, backoff, the duplicate guard, keeping the cursor in
// sessionStorage) is the JavaScript client's, imported from crm-events-client.js: the edge
// serves a copy of clients/js/crm-events-client.js next to this file. This file is the view:
//
//   1. backfill: the client's `history` option fills the table with the newest page
//      (GET /crm-events/history?n=100[&types=]), then streams right after it;
//   2. a reload (the cursor is kept in sessionStorage, one per type filter) or a bookmark
//      (?last_event_id=<cursor> in the page's URL, used once) backfills what happened since
//      (history after=<cursor>), with the newest page before it for context when that
//      catch-up reached the end;
//   3. the client reconnects a dropped stream (the browser's own retry, then its backoff) and
//      says why a refused one was refused (a 401/403 shows the sign-in notice);
//   4. a reset (some partitions could not continue without a gap) shows a notice naming
//      those partitions; the client backfills what is still stored, then streams;
//   5. a link ending in #token=<jwt> signs in: the token becomes the edge's auth cookie.
//
// Positions are cursors: opaque strings only the edge decodes; this page never parses one.
import { connectCrmEvents, cursorStorageKey, isCursor, setTokenCookie } from "./crm-events-client.js";

const HISTORY_N = 100;
const MAX_ROWS = 200;
const SPARK_SECONDS = 60;
const SPARK_MIN_SECONDS = 10;
const RATE_WINDOW_S = 5;
const LOG_MAX = 40;
const STORE_KEY = "crm-events:cursor";
const MAX_TYPES = 64;
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
  client: null, // the connection (crm-events-client.js); null while paused
  paused: false,
  attempts: 0, // failed connection attempts since the stream was last open
  lost: false, // the stream dropped and has not been open since
  reconnects: 0,
  duplicates: 0,
  backfilled: 0, // events from history since the connection last went live
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
};

// --- positions -------------------------------------------------------------------------------

function currentCursor() {
  return state.client ? state.client.cursor : savedPosition(false);
}

function savedPosition(fromUrl = true) {
  const params = new URLSearchParams(window.location.search);
  const given = params.get("last_event_id");
  if (fromUrl && given !== null) {
    // Used once: later reloads continue from sessionStorage.
    params.delete("last_event_id");
    replaceQuery(params);
    if (isCursor(given)) return given;
  }
  try {
    // The client keeps one cursor per type filter (a filtered cursor skips other types).
    const stored = sessionStorage.getItem(cursorStorageKey(state.types, STORE_KEY));
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

// --- the connection (crm-events-client.js) ----------------------------------------------------

function connect(lastEventId, history) {
  state.attempts = 0;
  state.lost = false;
  state.backfilled = 0;
  state.client = connectCrmEvents({
    url: new URL("crm-events", API),
    types: state.types,
    lastEventId,
    history,
    pageSize: HISTORY_N,
    backfillLimit: MAX_ROWS, // the table shows no more; the stream replays the rest
    storageKey: STORE_KEY,
    cookieName: authCookie,
    onEvent: onEvent,
    onReset: onReset,
    onDuplicate() {
      state.duplicates += 1;
      markDirty();
    },
    onState: onState,
  });
}

function onState(next, detail) {
  if (state.paused || next === "closed") return;
  const attempts = detail.attempts ?? 0;
  if (next === "connecting") {
    const what = {
      start: "Loading history",
      after: "Reset: loading what is still stored",
    }[detail.backfill];
    setConn("connecting", what || (detail.reason === "token_refreshed" ? "Signed in again" : "Connecting"));
  } else if (next === "live") {
    state.attempts = 0;
    showAuth(null);
    if (state.backfilled) log("connecting", `Backfilled ${state.backfilled} from history`);
    state.backfilled = 0;
    const cursor = state.client ? state.client.cursor : null;
    if (state.lost) {
      state.reconnects += 1;
      state.lost = false;
      setConn("live", `Live again after ${attempts} attempt${attempts === 1 ? "" : "s"}`);
    } else {
      setConn("live", cursor ? `Live, after ${shortCursor(cursor)}` : "Live");
    }
  } else if (next === "reconnecting") {
    state.attempts = attempts;
    state.lost = true;
    const status = detail.status;
    if (status === 401 || status === 403) showAuth(detail);
    let text;
    if (detail.reason === "dropped") {
      text = attempts === 1 ? "Stream lost; reconnecting" : `Attempt ${attempts} failed`;
    } else if (detail.reason === "cursor_refused") {
      text = `Position refused (${detail.message}); continuing from now`;
    } else {
      const why = status ? `HTTP ${status}` : detail.message || "no answer";
      text = `Stream refused (${why}, attempt ${attempts}); retrying`;
    }
    setConn("reconnecting", text);
  }
  markDirty();
}

function onEvent(envelope, cursor, meta) {
  const live = meta.source === "stream";
  if (live) {
    const second = Math.floor(Date.now() / 1000);
    state.perSecond.set(second, (state.perSecond.get(second) || 0) + 1);
    state.live += 1;
  } else {
    state.fromHistory += 1;
    state.backfilled += 1;
  }
  addEvent(cursor, envelope, live);
}

function resetPartitions(info) {
  return Array.isArray(info.partitions)
    ? info.partitions.filter((p) => p && Number.isSafeInteger(p.partition))
    : [];
}

// The client has moved its cursor to the reset's and forgotten the offsets of the partitions
// named (a recreated topic starts them again); this shows what happened.
function onReset(info, meta) {
  const partitions = resetPartitions(info || {});
  state.resetPending = true;
  showReset(info || {}, partitions);
  const names = partitions.map((p) => `p${p.partition}`).join(", ") || "all partitions";
  const where = meta.source === "history" ? "in the history" : "received";
  log("reset", `Reset ${where} (${info.reason || "?"}): ${names} continue from the oldest available`);
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

function showAuth(err) {
  el.authNotice.hidden = !err;
  if (err) {
    const what = err.status === 401 ? "Not signed in" : "Not allowed";
    const why = err.error ? `${err.error}: ${err.message}` : err.message;
    el.authText.textContent = `${what} (${err.status}): ${why}.`;
  }
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
  const cursor = currentCursor();
  el.cursor.textContent = cursor || "—";
  el.cursor.title = cursor ? `${cursor}\n(opaque: only the edge decodes it)` : "";
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
  log("connecting", types ? `Filter: ${types.join(", ")}` : "Filter cleared");
  markDirty();
  if (state.client) state.client.setTypes(types, { restart: true });
  else {
    try {
      // Paused: resuming starts from the new filter's history.
      sessionStorage.removeItem(cursorStorageKey(types, STORE_KEY));
    } catch {
      // storage disabled
    }
  }
}

function toggleType(type) {
  const current = new Set(state.types || []);
  if (current.has(type)) current.delete(type);
  else current.add(type);
  setFilter(current.size ? [...current].sort() : null);
}

function setPaused(paused) {
  if (paused === state.paused) return;
  state.paused = paused;
  el.pause.setAttribute("aria-pressed", String(paused));
  el.pauseLabel.textContent = paused ? "Resume" : "Pause";
  el.pause.querySelector(".button-icon").textContent = paused ? "▶" : "❚❚";
  if (paused) {
    // The stream closes; the client has kept the cursor in sessionStorage.
    state.client.close();
    state.client = null;
    setConn("paused", "Paused");
  } else {
    const cursor = savedPosition(false);
    setConn("connecting", `Resuming after ${cursor ? shortCursor(cursor) : "now"}`);
    // From the cursor (the stream replays what came meanwhile); without one, as on a load.
    connect(cursor, cursor ? 0 : HISTORY_N);
  }
  markDirty();
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

window.addEventListener("online", () => {
  if (state.client) state.client.reconnect();
});

// --- sign-in from a link -----------------------------------------------------------------------

// The edge names its auth cookie (CRM_EVENTS_AUTH_COOKIE) in a meta tag of this page.
const COOKIE_NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const cookieMeta = document.querySelector('meta[name="crm-events-auth-cookie"]');
const authCookie =
  cookieMeta && COOKIE_NAME_RE.test(cookieMeta.content) ? cookieMeta.content : "crm_events_token";
if (el.authCookieName) el.authCookieName.textContent = authCookie;

// A link ending in #token=<jwt> (the local stack prints one) signs the page in: the token
// becomes the auth cookie, which EventSource and fetch send on their own, and leaves the
// address bar. A fragment never reaches a server or its logs. setTokenCookie makes the cookie
// live no longer than the token, sent only by this site's own pages (SameSite=Strict), and
// only over TLS when the page came over TLS.
function adoptTokenFromFragment() {
  const match = /^#token=([A-Za-z0-9_.-]+)$/.exec(window.location.hash);
  if (!match) return;
  history.replaceState(null, "", window.location.pathname + window.location.search);
  if (setTokenCookie(match[1], { name: authCookie })) log("auth", "signed in with the token from the link");
  else log("auth", "the token from the link has expired: not signed in");
}

// --- go ------------------------------------------------------------------------------------------

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
connect(savedPosition(), HISTORY_N);
