#!/usr/bin/env node
// tail.mjs: follow the crm-events stream from Node >= 20 with fetch() alone (no EventSource,
// no dependencies), resuming across reconnects *and restarts*.
//
//   CRM_EVENTS_TOKEN=$(make token) node examples/js/tail.mjs
//       [--url http://127.0.0.1:9010/crm-events] [--types A,B] [--token JWT]
//       [--last-event-id CURSOR] [--state-file FILE] [--count N] [--json] [--contiguous]
//
// The token (CRM_EVENTS_TOKEN, or --token, which other users of the machine can see in the
// process list) goes in an Authorization: Bearer header; the edges refuse streams without one
// unless their authentication is off.
// stdout: one line per event, "<partition>:<offset> <type> <key>" (or, with --json, the
// envelope with its cursor). stderr: connection notes, any reset, and any duplicate.
//
// Positions are cursors: the SSE id of each event is an opaque string standing for
// everything the stream has sent so far. tail keeps the newest one and sends it back
// unchanged; it never parses one. With --state-file the cursor is saved after each event
// and read at start, so a restarted tail continues where it stopped. For the HTTPS port
// with the local stack's self-signed certificate, run with NODE_TLS_REJECT_UNAUTHORIZED=0.
//
// Checks, per partition, from each envelope's partition and offset (there is no order
// across partitions): an offset at or below the newest one seen is a duplicate, dropped and
// reported. Offsets have holes (transaction markers, compaction), so a jump is not a gap in
// general; --contiguous says the topic has none, and then tail reports every jump as a gap.
//
// What it does is what EventSource does, spelled out: send the last cursor as Last-Event-ID
// on every (re)connect, wait the server's `retry:` between attempts, and treat
// `event: reset` as "these partitions lost events: the id on this event is your new cursor".

import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { parseArgs } from "node:util";

const { values: args } = parseArgs({
  options: {
    url: { type: "string", default: process.env.CRM_EVENTS_URL ?? "http://127.0.0.1:9010/crm-events" },
    token: { type: "string", default: process.env.CRM_EVENTS_TOKEN || undefined },
    types: { type: "string" },
    "last-event-id": { type: "string" },
    "state-file": { type: "string" },
    count: { type: "string" },
    json: { type: "boolean", default: false },
    contiguous: { type: "boolean", default: false },
  },
});
const stateFile = args["state-file"];
const wanted = args.count ? Number(args.count) : Infinity;
const note = (text) => process.stderr.write(`[tail] ${text}\n`);

let cursor = args["last-event-id"] ?? (stateFile && existsSync(stateFile) ? readFileSync(stateFile, "utf8").trim() || null : null);
let retryMs = 2000; // until the server says otherwise
let received = 0;
const controller = new AbortController();
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => controller.abort());

const newest = new Map(); // partition -> newest offset seen

function remember(id) {
  cursor = id;
  if (stateFile) writeFileSync(stateFile, `${id}\n`);
}

// Per partition: true when the event is new. Reports duplicates, and jumps with --contiguous.
function follows(partition, offset) {
  const last = newest.get(partition);
  if (last !== undefined && offset <= last) {
    note(`DUPLICATE partition ${partition} offset ${offset} (newest seen ${last}): dropped`);
    return false;
  }
  if (args.contiguous && last !== undefined && offset > last + 1) {
    note(`GAP partition ${partition}: offsets ${last + 1}..${offset - 1} missing`);
  }
  newest.set(partition, offset);
  return true;
}

function dispatch({ type, data, id }) {
  if (type === "reset") {
    const info = JSON.parse(data);
    const parts = (info.partitions ?? [])
      .map((p) => `p${p.partition}: asked ${p.requested ?? "none"}, from ${p.oldest_available} (${p.reason})`)
      .join("; ");
    note(`RESET (${info.reason}): ${info.message} [${parts}]`);
    // Offsets of the partitions it names may start again (a recreated topic).
    const everything = info.reason === "topic_changed" || info.reason === "old_format";
    if (everything || !info.partitions?.length) newest.clear();
    else for (const p of info.partitions) newest.delete(p.partition);
    if (id) remember(id);
    return;
  }
  if (type !== "message") return; // other named events: not ours to handle
  const envelope = JSON.parse(data);
  // The cursor moves on even for a dropped event: it covers everything sent before it.
  if (id) remember(id);
  if (!follows(envelope.partition, envelope.offset)) return;
  received += 1;
  process.stdout.write(
    args.json
      ? `${JSON.stringify({ cursor: id, ...envelope })}\n`
      : `${envelope.partition}:${envelope.offset} ${envelope.type} ${envelope.key ?? "-"}\n`,
  );
  if (received >= wanted) controller.abort();
}

// The SSE wire format (https://html.spec.whatwg.org/multipage/server-sent-events.html):
// lines of "field: value"; a blank line ends an event; lines starting with ":" are comments.
async function readStream(body) {
  let buffer = "";
  let event = { type: "message", data: [], id: null };
  for await (const chunk of body.pipeThrough(new TextDecoderStream())) {
    buffer += chunk;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop(); // an incomplete last line waits for more
    for (const line of lines) {
      if (controller.signal.aborted) return; // --count reached
      if (line === "") {
        if (event.data.length) dispatch({ type: event.type, data: event.data.join("\n"), id: event.id });
        event = { type: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) {
        if (line.startsWith(": node ")) note(`served by ${line.slice(7)}`);
        continue;
      }
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      const value = colon === -1 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event.type = value;
      else if (field === "data") event.data.push(value);
      else if (field === "id" && !value.includes("\0")) event.id = value;
      else if (field === "retry" && /^\d+$/.test(value)) retryMs = Number(value);
    }
  }
}

while (!controller.signal.aborted) {
  const url = new URL(args.url);
  if (args.types) url.searchParams.set("types", args.types);
  const headers = { Accept: "text/event-stream" };
  if (cursor) headers["Last-Event-ID"] = cursor;
  if (args.token) headers.Authorization = `Bearer ${args.token.trim()}`;
  try {
    const res = await fetch(url, { headers, signal: controller.signal });
    if (res.ok) {
      note(`connected to ${url.origin}${cursor ? `, after cursor ${cursor}` : ""}`);
      await readStream(res.body);
      note("stream ended; reconnecting");
    } else {
      const body = await res.json().catch(() => ({}));
      note(`HTTP ${res.status} ${body.error ?? ""}: ${body.message ?? ""}`);
      if (res.status === 401 && !args.token) note("no token: set CRM_EVENTS_TOKEN (e.g. CRM_EVENTS_TOKEN=$(make token)) or pass --token");
      // A 4xx other than 429 will not get better by retrying (bad cursor, bad types, no token).
      if (res.status >= 400 && res.status < 500 && res.status !== 429) process.exit(1);
    }
  } catch (err) {
    if (controller.signal.aborted) break;
    note(`connection failed: ${err.cause?.code ?? err.message}`);
  }
  if (!controller.signal.aborted) await new Promise((r) => setTimeout(r, retryMs));
}
