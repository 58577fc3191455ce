// Unit tests of crm-events-client.js against an edge simulated in memory (node --test; run by
// tests/browser/test_js_client.py). The simulation keeps to the edge's documented rules where
// they matter here: one partition, cursors "c<position>" (the next offset to read), a history
// request with types= looks at no more than n*10 entries and then answers what it found, with
// next_after moved past what it looked at (edge/history.py), and a stream replays every
// wanted event after its cursor.

import assert from "node:assert/strict";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { connectCrmEvents, cursorStorageKey, DEFAULT_STORAGE_KEY } from "../crm-events-client.js";

const SCAN_FACTOR = 10;

function simulatedEdge(types) {
  const log = []; // {offset, type}
  const wants = (q) => {
    const only = q.get("types");
    return only ? (e) => only.split(",").includes(e.type) : () => true;
  };
  const position = (cursor) => Number(/^c(\d+)$/.exec(cursor)[1]);
  const item = (e) => ({ cursor: `c${e.offset + 1}`, type: e.type, key: null, partition: 0, offset: e.offset, timestamp_ms: e.offset, event: {} });

  function history(q) {
    const n = Number(q.get("n"));
    const want = wants(q);
    const budget = q.get("types") ? n * SCAN_FACTOR : Infinity;
    const after = q.get("after");
    if (!after) {
      const picked = [];
      let scanned = 0;
      for (let i = log.length - 1; i >= 0 && picked.length < n && scanned < budget; i -= 1, scanned += 1) {
        if (want(log[i])) picked.unshift(log[i]);
      }
      return { items: picked.map(item), count: picked.length, next_after: `c${log.length}`, reset: null };
    }
    let tail = position(after);
    const picked = [];
    for (let scanned = 0; tail < log.length && picked.length < n && scanned < budget; scanned += 1) {
      if (want(log[tail])) picked.push(log[tail]);
      tail += 1;
    }
    const next = picked.length === n ? `c${picked.at(-1).offset + 1}` : `c${tail}`;
    return { items: picked.map(item), count: picked.length, next_after: next, reset: null };
  }

  class EventSource {
    static instances = [];
    constructor(url) {
      this.url = new URL(url);
      this.readyState = 0;
      this.listeners = {};
      EventSource.instances.push(this);
      setTimeout(() => this.open(), 0);
    }
    addEventListener(type, fn) {
      (this.listeners[type] ||= []).push(fn);
    }
    emit(type, data, id = "") {
      const message = { data: JSON.stringify(data), lastEventId: id };
      if (type === "message") this.onmessage?.(message);
      else for (const fn of this.listeners[type] ?? []) fn(message);
    }
    open() {
      if (this.readyState === 2) return;
      this.readyState = 1;
      this.onopen?.();
      const q = this.url.searchParams;
      const want = wants(q);
      const from = q.get("last_event_id") ? position(q.get("last_event_id")) : log.length;
      for (const e of log.slice(from)) if (this.readyState === 1 && want(e)) this.emit("message", item(e), `c${e.offset + 1}`);
    }
    close() {
      this.readyState = 2;
    }
  }
  EventSource[Symbol.for("eventsource.supports-fetch-override")] = true;

  const fetch = async (url) => {
    const body = history(new URL(url).searchParams);
    return { ok: true, status: 200, json: async () => body };
  };
  const append = (type, count = 1) => {
    for (let i = 0; i < count; i += 1) log.push({ offset: log.length, type });
  };
  return { EventSource, fetch, append, types };
}

function recorder() {
  const got = { events: [], duplicates: [], states: [] };
  return {
    got,
    onEvent: (e, id, meta) => got.events.push({ offset: e.offset, context: meta.context, source: meta.source }),
    onDuplicate: (e) => got.duplicates.push(e.offset),
    onState: (state, detail) => got.states.push({ state, ...detail }),
  };
}

test("a filtered start whose first catch-up page is cut by the scan budget loses nothing", async () => {
  const edge = simulatedEdge();
  edge.append("Y", 3); // offsets 0-2: before the cursor
  const cursor = "c3";
  edge.append("Y"); // 3: after the cursor, on the first page
  edge.append("X", 150); // more than n*10 the filter skips
  edge.append("Y", 5); // 154-158: after the scan budget; the newest three are the context
  const { got, ...callbacks } = recorder();
  const client = connectCrmEvents({
    url: "http://edge.test/crm-events", EventSource: edge.EventSource, fetch: edge.fetch, storage: null,
    types: ["Y"], lastEventId: cursor, history: 3, pageSize: 5, ...callbacks,
  });
  await sleep(50);
  client.close();
  // Every Y after the cursor once, in order; no context (the catch-up did not reach the end).
  assert.deepEqual(got.events.map((e) => e.offset), [3, 154, 155, 156, 157, 158]);
  assert.deepEqual(got.duplicates, []);
  assert.ok(got.events.every((e) => !e.context));
});

test("a start whose catch-up reaches the end shows the newest page before the cursor first", async () => {
  const edge = simulatedEdge();
  edge.append("Y", 3);
  edge.append("X", 2);
  const cursor = "c5";
  edge.append("Y", 2); // 5, 6
  const { got, ...callbacks } = recorder();
  const client = connectCrmEvents({
    url: "http://edge.test/crm-events", EventSource: edge.EventSource, fetch: edge.fetch, storage: null,
    types: ["Y"], lastEventId: cursor, history: 3, pageSize: 5, ...callbacks,
  });
  await sleep(50);
  client.close();
  assert.deepEqual(got.events, [
    { offset: 2, context: true, source: "history" },
    { offset: 5, context: false, source: "history" },
    { offset: 6, context: false, source: "history" },
  ]);
  assert.deepEqual(got.duplicates, []);
});

function fakeJwt(exp) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${part({ alg: "HS256" })}.${part({ exp })}.sig`;
}

for (const [what, stale] of [
  ["a token the edge ends at once", "tok"],
  ["a token already past its exp", fakeJwt(Math.floor(Date.now() / 1000) - 10)],
]) {
  test(`getToken() giving ${what} is retried with backoff, not in a loop`, async () => {
    const edge = simulatedEdge();
    // Every stream ends at once with auth_expired (the edge accepts a token up to its leeway
    // past exp, then ends the stream).
    class Expiring extends edge.EventSource {
      open() {
        super.open();
        if (this.readyState === 1) this.emit("auth_expired", { error: "token_expired", message: "expired" });
      }
    }
    let calls = 0;
    const { got, ...callbacks } = recorder();
    const client = connectCrmEvents({
      url: "http://edge.test/crm-events", EventSource: Expiring, fetch: edge.fetch, storage: null,
      token: stale, getToken: async () => ((calls += 1), stale), retry: { initialMs: 100, maxMs: 400 }, ...callbacks,
    });
    await sleep(800);
    client.close();
    // Without backoff: hundreds of streams in 0.8 s. With it: 100, 200, 400, 400 ms apart at most.
    assert.ok(edge.EventSource.instances.length <= 8, `${edge.EventSource.instances.length} streams`);
    assert.ok(calls <= 8, `${calls} getToken() calls`);
    const waits = got.states.filter((s) => s.retryInMs !== undefined);
    assert.ok(waits.length >= 2, JSON.stringify(got.states));
    assert.ok(waits.every((s) => s.status === 401 || s.reason === "get_token_failed"), JSON.stringify(waits));
  });
}

test("each refusal counts one attempt", async () => {
  class Refused {
    static instances = 0;
    constructor() {
      Refused.instances += 1;
      this.readyState = 0;
      setTimeout(() => {
        this.readyState = 2;
        this.onerror?.({ code: 503 });
      }, 0);
    }
    addEventListener() {}
    close() {
      this.readyState = 2;
    }
  }
  const fetch = async () => ({ ok: false, status: 503, json: async () => ({ error: "unavailable", message: "later" }) });
  const { got, ...callbacks } = recorder();
  const client = connectCrmEvents({
    url: "http://edge.test/crm-events", EventSource: Refused, fetch, storage: null, retry: { initialMs: 20, maxMs: 40 }, ...callbacks,
  });
  await sleep(200);
  client.close();
  const attempts = got.states.filter((s) => s.state === "reconnecting").map((s) => s.attempts);
  assert.ok(attempts.length >= 3, JSON.stringify(got.states));
  assert.deepEqual(attempts, attempts.map((_, i) => i + 1));
});

test("an id that is not a cursor leaves the previous cursor, and cursors are kept per filter", async () => {
  const edge = simulatedEdge();
  const stored = new Map([[DEFAULT_STORAGE_KEY, "c1"]]); // a cursor of the unfiltered view
  const storage = {
    getItem: (k) => stored.get(k) ?? null,
    setItem: (k, v) => stored.set(k, v),
    removeItem: (k) => stored.delete(k),
  };
  const warn = console.warn;
  console.warn = () => {};
  try {
    const client = connectCrmEvents({
      url: "http://edge.test/crm-events", EventSource: edge.EventSource, fetch: edge.fetch, storage, types: ["B", "A", "B"],
    });
    await sleep(20);
    const [es] = edge.EventSource.instances;
    assert.equal(es.url.searchParams.get("last_event_id"), null); // not the unfiltered view's cursor
    const envelope = (offset) => ({ type: "A", key: null, partition: 0, offset, timestamp_ms: 0, event: {} });
    es.emit("message", envelope(7), "c8");
    es.emit("message", envelope(8), "x".repeat(20_000));
    assert.equal(client.cursor, "c8");
    client.close();
  } finally {
    console.warn = warn;
  }
  assert.equal(cursorStorageKey(["B", "A", "B"]), `${DEFAULT_STORAGE_KEY}:A,B`);
  assert.equal(stored.get(`${DEFAULT_STORAGE_KEY}:A,B`), "c8");
  assert.equal(stored.get(DEFAULT_STORAGE_KEY), "c1");
});
