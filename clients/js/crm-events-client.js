// crm-events-client.js: the browser (and Node) client for the crm-events stream.
//
// One dependency-free ES module: vendor the file or install the package. It does the three
// things every consumer of GET /crm-events must get right, and keeps the token fresh:
//
//   connect  an EventSource on /crm-events?types=...; each event's data is the envelope
//            {type, key, partition, offset, timestamp_ms, event}. Its SSE id is a *cursor*:
//            an opaque string standing for everything the stream has sent so far. Kept (in
//            sessionStorage by default), never parsed, compared or built here.
//   resume   the browser's own reconnect sends the cursor as Last-Event-ID; every stream this
//            module opens itself carries it as ?last_event_id=. The server sends exactly the
//            events after it. A per-partition guard drops anything already handed over.
//   reset    when some partitions cannot continue without a gap, the stream sends
//            `event: reset`; its id is the new cursor. This module then closes the stream,
//            pages GET /crm-events/history?after=<that id> (everything still stored after
//            it, which is where the stream would continue too) and opens the stream again
//            after the last page: the events of a reset reach onEvent once, in order per
//            partition, even those a live stream would not replay (a topic recreated under a
//            running edge).
//   auth     on `event: auth_expired` (sent right before the server ends a stream whose token
//            expired), and when a refused stream's probe of /crm-events/history answers 401,
//            getToken() is called and the stream reopens after the cursor with the new token:
//            as the auth cookie (browser), ?access_token= (an edge with
//            CRM_EVENTS_AUTH_QUERY_TOKEN=true), or an Authorization header (Node, through the
//            fetch option of the `eventsource` package). A stream that ends with auth_expired
//            within seconds of opening, twice in a row, or a new token already past its `exp`,
//            means the new token is no better: the next attempt waits (backoff) instead of
//            reconnecting at once, so a provider handing out a stale token cannot cause a storm.
//
// Order: events of one Kafka partition (so of one record key) come in Kafka's order; there is
// no order across partitions. See README.md for the options; crm-events-client.d.ts has the
// types.

const CURSOR_RE = /^[\x21-\x7e]{1,16384}$/; // a sanity bound only (the edge caps cursors)
// A stream ended by auth_expired sooner than this after it opened did not live on its token.
const SHORT_LIVED_MS = 5000;
const COOKIE_NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;

/** The cookie the edges read a token from unless CRM_EVENTS_AUTH_COOKIE says otherwise. */
export const DEFAULT_COOKIE_NAME = "crm_events_token";
/** Where the cursor is kept in `storage` unless `storageKey` says otherwise. */
export const DEFAULT_STORAGE_KEY = "crm-events:cursor";

/** An HTTP error answered by the API: `status`, and the JSON body's `error` and `message`. */
export class CrmEventsHttpError extends Error {
  constructor(status, error, message) {
    super(error ? `${error}: ${message}` : message || `HTTP ${status}`);
    this.name = "CrmEventsHttpError";
    this.status = status;
    this.error = error || null;
    this.detail = message || null;
  }
}

/**
 * The storage key a cursor of this filter is kept under: `storageKey` itself for every type,
 * else `storageKey` + ":" + the sorted, de-duplicated types. A filtered cursor moves past the
 * events its filter skipped, so a cursor of one filter must not resume another.
 */
export function cursorStorageKey(types, storageKey = DEFAULT_STORAGE_KEY) {
  const names = types && types.length ? [...new Set(types)].sort() : null;
  return names ? `${storageKey}:${names.join(",")}` : storageKey;
}

/** Whether `text` can be a cursor (opaque: only the server decodes it). */
export function isCursor(text) {
  return typeof text === "string" && CURSOR_RE.test(text);
}

/**
 * Per-partition duplicate check from the envelopes: `seen(envelope)` is true when an event of
 * that partition at or above this offset was already handed over. Offsets grow within a
 * partition but have holes, so a jump is not a gap; nothing orders partitions.
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

/** A JWT's `exp` claim (epoch seconds), or null. Not a verification: the edge does that. */
export function tokenExpiry(token) {
  try {
    const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
    const exp = Number(claims.exp);
    return Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/**
 * Store `token` in the auth cookie, which EventSource and fetch send by themselves (an
 * EventSource cannot set headers). It lives no longer than the token, is sent only by this
 * site's own pages (SameSite=Strict) and only over TLS when the page came over TLS. Returns
 * false (and sets nothing) for an expired token.
 */
export function setTokenCookie(token, { name = DEFAULT_COOKIE_NAME, path = "/" } = {}) {
  if (typeof document === "undefined") throw new Error("setTokenCookie needs a document");
  if (!COOKIE_NAME_RE.test(name)) throw new Error(`not a cookie name: ${name}`);
  if (!/^[A-Za-z0-9_.~+/=-]+$/.test(token)) throw new Error("not a token");
  const exp = tokenExpiry(token);
  const maxAge = exp === null ? null : Math.floor(exp - Date.now() / 1000);
  if (maxAge !== null && maxAge <= 0) return false;
  const secure = typeof location !== "undefined" && location.protocol === "https:" ? "; Secure" : "";
  const lifetime = maxAge === null ? "" : `; Max-Age=${maxAge}`;
  document.cookie = `${name}=${token}; Path=${path}${lifetime}; SameSite=Strict${secure}`;
  return true;
}

function defaultStorage() {
  try {
    return typeof sessionStorage !== "undefined" ? sessionStorage : null;
  } catch {
    return null; // storage disabled (a sandboxed frame): resuming after a reload starts from now
  }
}

// An exception thrown by an application callback is reported as uncaught, without breaking
// the connection logic around it.
function safely(fn, ...args) {
  try {
    fn(...args);
  } catch (err) {
    if (typeof globalThis.reportError === "function") globalThis.reportError(err);
    else setTimeout(() => {
      throw err;
    });
  }
}

const FETCH_OVERRIDE = Symbol.for("eventsource.supports-fetch-override");

// getToken() failed, or gave nothing usable: retried with backoff ("get_token_failed").
class TokenError extends Error {}

/**
 * Open the stream and keep it open. Returns a handle: `cursor`, `state`, `types`,
 * `setTypes(types, {restart})`, `reconnect()`, `close()`. Options: see README.md and
 * crm-events-client.d.ts.
 */
export function connectCrmEvents(options = {}) {
  const {
    url = "/crm-events",
    historyUrl = null,
    storage = defaultStorage(),
    storageKey = DEFAULT_STORAGE_KEY,
    history = 0,
    pageSize = 100,
    backfillLimit = 1000,
    getToken = null,
    cookieName = DEFAULT_COOKIE_NAME,
    withCredentials = false,
    retry = {},
    onEvent = () => {},
    onReset = () => {},
    onState = () => {},
    onDuplicate = () => {},
    EventSource: EventSourceImpl = globalThis.EventSource,
    fetch: fetchImpl = globalThis.fetch,
  } = options;
  const hasDocument = typeof document !== "undefined";
  const tokenTransport = options.tokenTransport ?? (hasDocument ? "cookie" : "header");
  const retryInitialMs = retry.initialMs ?? 1000;
  const retryMaxMs = retry.maxMs ?? 15000;

  if (typeof EventSourceImpl !== "function") {
    throw new Error("no EventSource here: pass one as options.EventSource (in Node: the eventsource package)");
  }
  if (typeof fetchImpl !== "function") throw new Error("no fetch here: pass one as options.fetch");
  if (!["cookie", "query", "header"].includes(tokenTransport)) {
    throw new Error(`tokenTransport must be "cookie", "query" or "header", not ${tokenTransport}`);
  }
  const authenticating = Boolean(options.token || getToken);
  if (authenticating && tokenTransport === "header" && !EventSourceImpl[FETCH_OVERRIDE]) {
    throw new Error(
      'tokenTransport "header" needs an EventSource that takes { fetch } (the eventsource package); ' +
        'a browser\'s EventSource cannot send headers: use "cookie" or "query"',
    );
  }
  if (authenticating && tokenTransport === "cookie" && !hasDocument) {
    throw new Error('tokenTransport "cookie" needs a document: use "header" outside a browser');
  }

  const base = typeof location !== "undefined" ? location.href : undefined;
  const streamUrl = new URL(url, base);
  const pagesUrl = new URL(historyUrl ?? `${streamUrl.pathname.replace(/\/+$/, "")}/history`, streamUrl);

  let types = normalTypes(options.types);
  let cursor = isCursor(options.lastEventId) ? options.lastEventId : readStored();
  let token = options.token || null;
  let state = null;
  let source = null;
  let gen = 0; // every (re)start bumps it; callbacks of an older one are ignored
  let attempts = 0; // failed attempts since the stream was last open
  let refreshed = false; // a token was fetched since the last success: a 401 now means backoff
  // Consecutive signs that getToken() gives no usable token (a stream ended by auth_expired
  // within SHORT_LIVED_MS, a token already past its exp): from the second, back off.
  let tokenFailures = 0;
  let tokenStale = false; // ask getToken() before the next attempt
  let timer = null;
  let closed = false;
  // A backfill from history to run before the next stream: "start" (the newest `history`
  // events, then those after the cursor) or "after" (the events after the cursor, post-reset).
  let backfill = history > 0 ? "start" : null;
  const guard = partitionTracker();

  if (token && tokenTransport === "cookie") setTokenCookie(token, { name: cookieName });

  function normalTypes(list) {
    return list && list.length ? [...list] : null;
  }

  function readStored() {
    try {
      const stored = storage?.getItem(cursorStorageKey(types, storageKey));
      return isCursor(stored) ? stored : null;
    } catch {
      return null;
    }
  }

  // Keeps `next` as the cursor. Something that cannot be a cursor (the edge never sends one)
  // leaves the previous cursor in place: resuming from it replays, and the guard drops, what
  // came since, where dropping the cursor would resume from "now" and skip it.
  function remember(next) {
    if (!isCursor(next)) {
      console.warn(`crm-events: ignored an id that is not a cursor (${String(next).length} characters); kept the previous cursor`);
      return;
    }
    cursor = next;
    store();
  }

  // Forgets the cursor on purpose (refused by the edge, or a restart with another filter).
  function forget() {
    cursor = null;
    store();
  }

  function store() {
    const where = cursorStorageKey(types, storageKey);
    try {
      if (cursor) storage?.setItem(where, cursor);
      else storage?.removeItem(where);
    } catch {
      // storage full or disabled: resuming after a reload then starts from "now"
    }
  }

  function setState(next, detail = {}) {
    state = next;
    safely(onState, next, detail);
  }

  function target(kind, query) {
    const out = new URL(kind === "stream" ? streamUrl : pagesUrl);
    for (const [name, value] of Object.entries(query)) {
      if (value !== null && value !== undefined) out.searchParams.set(name, String(value));
    }
    if (types) out.searchParams.set("types", types.join(","));
    if (token && tokenTransport === "query") out.searchParams.set("access_token", token);
    return out.toString();
  }

  function authHeaders() {
    return token && tokenTransport === "header" ? { Authorization: `Bearer ${token}` } : {};
  }

  async function getHistory(query) {
    const res = await fetchImpl(target("history", query), {
      headers: { Accept: "application/json", ...authHeaders() },
      cache: "no-store",
      credentials: withCredentials ? "include" : "same-origin",
    });
    let body = null;
    try {
      body = await res.json();
    } catch {
      // not JSON: reported by its status below
    }
    if (!res.ok) throw new CrmEventsHttpError(res.status, body?.error, body?.message);
    return body && typeof body === "object" ? body : {};
  }

  function handOver(envelope, id, meta) {
    if (!envelope || typeof envelope !== "object") return;
    if (guard.seen(envelope)) safely(onDuplicate, envelope, id);
    else safely(onEvent, envelope, id, meta);
  }

  function resetSeen(info, source) {
    const named = Array.isArray(info.partitions)
      ? info.partitions.filter((p) => p && Number.isSafeInteger(p.partition)).map((p) => p.partition)
      : [];
    const everything = info.reason === "topic_changed" || info.reason === "old_format";
    guard.forget(everything || !named.length ? null : named);
    safely(onReset, info, { source });
  }

  const key = (item) => `${item.partition}:${item.offset}`;

  // Pages the history after the cursor (up to backfillLimit events), handing each event
  // over. The stream then continues from the cursor reached: whatever the limit left over, it
  // replays, so the limit bounds only what comes as JSON pages.
  //
  // `context` (the newest page, on a start) goes first, but only when the catch-up provably
  // reached the end: a page after the cursor came back empty without moving it. Only then is
  // every context item that is not among the catch-up's own items before the cursor. A short
  // page is not such a proof: a filtered request stops after scanning n*10 entries of a
  // partition, and the context may then hold events after the cursor that the catch-up has not
  // reached; fed to the duplicate guard first, they would make the catch-up's and the
  // stream's events below them look like duplicates (dropped: a gap). So, while the context
  // may still go first, the first short page is held back, and one more page decides.
  async function catchUp(my, context) {
    if (!cursor) return; // nothing to page after (history without after= is the newest page)
    let fetched = 0;
    let held = context ? [] : null; // catch-up items waiting for the context's decision
    let first = true;
    const release = (withContext) => {
      if (withContext) {
        const fresh = new Set(held.map(key));
        for (const { cursor: id, ...envelope } of context.filter((item) => !fresh.has(key(item)))) {
          handOver(envelope, id, { source: "history", context: true });
        }
      }
      for (const { cursor: id, ...envelope } of held) handOver(envelope, id, { source: "history", context: false });
      held = null;
    };
    while (fetched < backfillLimit) {
      const n = Math.min(pageSize, backfillLimit - fetched);
      const after = cursor;
      const page = await getHistory({ n, after });
      if (my !== gen) return;
      const items = Array.isArray(page.items) ? page.items : [];
      if (page.reset && typeof page.reset === "object") {
        if (held) release(false); // positions start again somewhere: the context proves nothing
        resetSeen(page.reset, "history");
      }
      const moved = isCursor(page.next_after) && page.next_after !== after;
      if (held) {
        if (!items.length && !moved) return release(true); // the end: nothing after the cursor
        if (first && items.length < n) {
          first = false;
          held = items; // a short first page: the next one tells whether it was the end
          if (isCursor(page.next_after)) remember(page.next_after);
          fetched += items.length;
          continue;
        }
        // A full first page (more than a page came since), or a second page that moved: not
        // the end, so no context.
        release(false);
      }
      first = false;
      for (const item of items) {
        const { cursor: id, ...envelope } = item;
        handOver(envelope, id, { source: "history", context: false });
      }
      if (isCursor(page.next_after)) remember(page.next_after);
      fetched += items.length;
      if (items.length < n) return;
    }
    if (held) release(false);
  }

  async function runBackfill(my) {
    if (backfill === "start") {
      const newest = await getHistory({ n: history });
      if (my !== gen) return;
      const items = Array.isArray(newest.items) ? newest.items : [];
      if (!cursor) {
        for (const { cursor: id, ...envelope } of items) {
          handOver(envelope, id, { source: "history", context: false });
        }
        if (isCursor(newest.next_after)) remember(newest.next_after);
        return;
      }
      await catchUp(my, items);
    } else {
      await catchUp(my, null);
    }
  }

  async function run(detail = {}) {
    const my = ++gen;
    clearTimeout(timer);
    timer = null;
    source?.close();
    source = null;
    if (closed) return;
    if (state !== "reconnecting") setState("connecting", { backfill: backfill, ...detail });
    try {
      // No token yet ("cookie": the cookie may hold one), or the last one proved useless.
      if (getToken && (tokenStale || (!token && tokenTransport !== "cookie"))) await refreshToken(my);
      if (my !== gen) return;
      if (backfill) {
        try {
          await runBackfill(my);
        } catch (err) {
          // Refused (auth, a cursor the edge cannot read): handled below, the backfill is
          // redone. Otherwise (history unavailable) the stream replays the same from the cursor.
          if (err instanceof CrmEventsHttpError && [400, 401, 403].includes(err.status)) throw err;
        }
        if (my !== gen) return;
        backfill = null;
      }
      openStream(my);
    } catch (err) {
      if (my === gen) await failed(err, my);
    }
  }

  // Asks getToken() for a token and uses it. A token already past its `exp` is used too (the
  // clocks may differ), but counts as a sign of a provider with nothing better: TokenError, so
  // that the attempt with it waits a backoff first.
  async function refreshToken(my) {
    refreshed = true;
    tokenStale = false;
    let next;
    try {
      next = await getToken();
    } catch (err) {
      throw new TokenError(String(err?.message ?? err));
    }
    if (my !== gen || closed) return;
    if (typeof next !== "string" || !next.trim()) throw new TokenError("getToken() gave no token");
    token = next.trim();
    const exp = tokenExpiry(token);
    if (exp !== null && exp <= Date.now() / 1000) {
      tokenFailures += 1;
      throw new TokenError(`getToken() gave a token that expired ${new Date(exp * 1000).toISOString()}`);
    }
    if (tokenTransport === "cookie") setTokenCookie(token, { name: cookieName });
  }

  async function failed(err, my) {
    if (err instanceof TokenError) {
      backoff({ reason: "get_token_failed", status: null, error: null, message: err.message }, tokenFailures);
      return;
    }
    const status = err instanceof CrmEventsHttpError ? err.status : null;
    const info = { status, error: err?.error ?? null, message: err?.detail ?? String(err?.message ?? err) };
    if (status === 401 && getToken && !refreshed) {
      setState("reconnecting", { attempts, reason: "unauthorized", ...info });
      try {
        await refreshToken(my);
      } catch (tokenErr) {
        if (my === gen) await failed(tokenErr, my);
        return;
      }
      if (my === gen) run({ reason: "token_refreshed" });
      return;
    }
    if (status === 400 && err.error === "invalid_cursor" && cursor) {
      // A cursor the edge refuses (edited, or of another deployment): retrying with it would
      // fail forever. Continue from now (or from the newest page), and say so.
      setState("reconnecting", { attempts, reason: "cursor_refused", ...info });
      forget();
      guard.forget(null);
      if (history > 0) backfill = "start";
      run({ reason: "cursor_refused" });
      return;
    }
    backoff(info);
  }

  // The next attempt after a delay doubling with `level` (default: the failed attempts since
  // the stream was last open), with jitter. Every failure counts once, here.
  function backoff(info, level = attempts + 1) {
    attempts += 1;
    const exp = Math.min(retryMaxMs, retryInitialMs * 2 ** Math.min(Math.max(level, 1) - 1, 6));
    const delay = Math.round(exp * (0.5 + Math.random() / 2));
    setState("reconnecting", { attempts, retryInMs: delay, reason: "refused", ...info });
    clearTimeout(timer);
    timer = setTimeout(() => {
      refreshed = false; // a user may have signed in meanwhile: ask getToken() again
      run();
    }, delay);
  }

  // EventSource does not say why it was refused; the history endpoint answers with the same
  // authentication and the same cursor check, and says why, as JSON.
  async function diagnose(my, code) {
    try {
      // The eventsource package tells the status; a 401 needs no probe. Anything else is
      // asked of the history, which says why (e.g. 400 invalid_cursor).
      if (code === 401) throw new CrmEventsHttpError(401, "unauthorized", "the stream was refused (HTTP 401)");
      await getHistory({ n: 1, after: cursor });
      if (my === gen) backoff({ status: null, error: null, message: "the stream was refused" });
    } catch (err) {
      if (my === gen) await failed(err, my);
    }
  }

  function openStream(my) {
    const init = { withCredentials };
    if (tokenTransport === "header") {
      // Read at every request, so the package's own reconnects carry the newest token too.
      init.fetch = (input, request) =>
        fetchImpl(input, { ...request, headers: { ...request.headers, ...authHeaders() } });
    }
    const es = new EventSourceImpl(target("stream", { last_event_id: cursor }), init);
    source = es;
    const current = () => my === gen && source === es;
    let openedAt = Date.now();

    es.onopen = () => {
      if (!current()) return;
      openedAt = Date.now();
      const after = attempts;
      attempts = 0;
      refreshed = false;
      setState("live", { cursor, attempts: after });
    };

    // Every data event: no `event:` name, so onmessage receives it.
    es.onmessage = (message) => {
      if (!current()) return;
      let envelope;
      try {
        envelope = JSON.parse(message.data);
      } catch {
        return;
      }
      // The cursor moves on even for a dropped event: it covers everything before it.
      if (message.lastEventId) remember(message.lastEventId);
      handOver(envelope, message.lastEventId, { source: "stream", context: false });
    };

    // EventSource delivers named events only to a listener for that name.
    es.addEventListener("reset", (message) => {
      if (!current()) return;
      let info = {};
      try {
        info = JSON.parse(message.data) || {};
      } catch {
        // still a reset
      }
      if (isCursor(message.lastEventId)) remember(message.lastEventId);
      resetSeen(info, "stream");
      if (backfillLimit > 0) {
        backfill = "after";
        run({ reason: "reset" });
      }
    });

    es.addEventListener("auth_expired", (message) => {
      if (!current()) return;
      // The server ends this stream now; reconnecting with the same token would be refused.
      es.close();
      source = null;
      let info = {};
      try {
        info = JSON.parse(message.data) || {};
      } catch {
        // still expired
      }
      const err = new CrmEventsHttpError(401, info.error || "token_expired", info.message || "the access token has expired");
      // A stream that lived on its token is the normal end of a token: renew it at once. One
      // ended within seconds of opening, twice in a row, says the new token is no better
      // (a provider handing out one that is expired, or about to be): wait before the next.
      tokenFailures = Date.now() - openedAt < SHORT_LIVED_MS ? tokenFailures + 1 : 0;
      if (tokenFailures >= 2 && getToken) {
        tokenStale = true;
        backoff({ reason: "token_expired", status: 401, error: err.error, message: err.detail }, tokenFailures - 1);
        return;
      }
      refreshed = false;
      failed(err, my);
    });

    es.onerror = (ev) => {
      if (!current()) return;
      if (es.readyState === 2 /* CLOSED */) {
        // Given up (an error status such as 401/502/503, or a wrong content type): find out
        // why, then reconnect ourselves, from the cursor.
        source = null;
        diagnose(my, ev?.code);
      } else {
        // CONNECTING: it reconnects by itself after the server's retry: hint, sending
        // Last-Event-ID. (A refusal is counted by backoff(), once.)
        attempts += 1;
        setState("reconnecting", { attempts, reason: "dropped" });
      }
    };
  }

  run();
  return {
    get cursor() {
      return cursor;
    },
    get state() {
      return state;
    },
    get types() {
      return types ? [...types] : null;
    },
    setTypes(next, { restart = false } = {}) {
      types = normalTypes(next);
      if (restart) {
        forget();
        guard.forget(null);
        backfill = history > 0 ? "start" : null;
      }
      attempts = 0;
      if (!closed) run({ reason: "types" });
    },
    reconnect() {
      if (closed || state === "live") return;
      attempts = 0;
      run({ reason: "reconnect" });
    },
    close() {
      if (closed) return;
      closed = true;
      gen += 1;
      clearTimeout(timer);
      source?.close();
      source = null;
      setState("closed", { cursor });
    },
  };
}
