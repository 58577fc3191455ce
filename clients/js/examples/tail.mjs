#!/usr/bin/env node
// tail.mjs: follow the crm-events stream from Node >= 20 with the client module
// (../crm-events-client.js) and the `eventsource` package, resuming across reconnects *and
// restarts*. The protocol (cursor resume, the reset backfill from the history, the
// per-partition duplicate guard) is the module's; this file only turns its callbacks into lines.
//
//   CRM_EVENTS_TOKEN=$(make token) node clients/js/examples/tail.mjs
//       [--url http://127.0.0.1:9010/crm-events] [--types A,B] [--token JWT]
//       [--last-event-id CURSOR] [--state-file FILE] [--limit N] [--json] [--contiguous]
//
// Needs clients/js/node_modules (`make install`, or `npm ci` in clients/js): Node resolves the
// `eventsource` package from there because this file lives under clients/js.
//
// --limit N (or its former name --count) exits (status 0) after N events, e.g. to take a
// sample; without it, tail follows the stream until Ctrl-C. The default --url is
// CRM_EVENTS_URL, else http://127.0.0.1:9010/crm-events.
//
// The token (CRM_EVENTS_TOKEN, or --token, which other users of the machine can see in the
// process list) goes in an Authorization: Bearer header, added by the module through the
// package's fetch option; the edges refuse streams without one unless their authentication is
// off. A refused or expired token ends tail (status 1): it has no way to get another.
//
// stdout: one line per event, "<partition>:<offset> <type> <key>" (or, with --json, the
// envelope with its cursor). stderr: connection notes, any reset, and any duplicate.
//
// Positions are cursors: opaque strings standing for everything handed over so far. With
// --state-file the module reads its cursor from that file at start (through the storage
// option), and tail replaces the file whole with each event's cursor once that event is
// printed, so a restarted tail continues after the last event it printed: a tail stopped
// between the two prints that event again rather than skip it. The file holds one cursor,
// for one --types filter: a filtered cursor has moved past the events its filter skipped.
// For the HTTPS port with the local stack's self-signed certificate, run with
// NODE_TLS_REJECT_UNAUTHORIZED=0.
//
// Offsets have holes (transaction markers, compaction), so a jump is not a gap in general;
// --contiguous says the topic has none, and then tail reports every jump as a gap.

import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { parseArgs } from "node:util";
import { connectCrmEvents, DEFAULT_STORAGE_KEY, isCursor } from "../crm-events-client.js";

const note = (text) => process.stderr.write(`[tail] ${text}\n`);

let EventSource;
try {
  ({ EventSource } = await import("eventsource"));
} catch (err) {
  note(`cannot load the eventsource package (${err.code ?? err.message}):`);
  note("run `make install` (or `npm ci` in clients/js)");
  process.exit(1);
}

const { values: args } = parseArgs({
  options: {
    url: { type: "string", default: process.env.CRM_EVENTS_URL || "http://127.0.0.1:9010/crm-events" },
    token: { type: "string", default: process.env.CRM_EVENTS_TOKEN || undefined },
    types: { type: "string" },
    "last-event-id": { type: "string" },
    "state-file": { type: "string" },
    limit: { type: "string" },
    count: { type: "string" }, // the former name of --limit
    json: { type: "boolean", default: false },
    contiguous: { type: "boolean", default: false },
  },
});
const limit = args.limit ?? args.count;
const wanted = limit ? Number(limit) : Infinity;
if (!(wanted > 0)) {
  note(`--limit must be a positive number, not ${limit}`);
  process.exit(2);
}
const lastEventId = args["last-event-id"];
if (lastEventId !== undefined && !isCursor(lastEventId)) {
  note(`--last-event-id is not a cursor: ${JSON.stringify(lastEventId)}`);
  process.exit(2);
}

// One file holding the cursor (the key is ignored: one cursor per file). Written to a
// temporary file of its own beside it and renamed over it, so that a tail stopped at any
// moment leaves the old cursor or the new one, never half of one.
function fileStorage(path) {
  const temporary = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
  return {
    getItem() {
      return existsSync(path) ? readFileSync(path, "utf8").trim() || null : null;
    },
    setItem(_key, value) {
      writeFileSync(temporary, `${value}\n`);
      renameSync(temporary, path);
    },
  };
}
const stateFile = args["state-file"] ? fileStorage(args["state-file"]) : null;
// What the module sees: the file to start from, but no writes; onEvent saves each cursor
// after printing its event (the module moves its cursor before handing an event over).
const storage = stateFile && { getItem: stateFile.getItem, setItem() {}, removeItem() {} };

// Only for --contiguous: the module drops duplicates itself, this reports jumps.
const newest = new Map(); // partition -> newest offset printed
let received = 0;
let client = null;

function stop(status) {
  client?.close();
  process.exit(status);
}

function resetReport(info, meta) {
  const parts = (info.partitions ?? [])
    .map((p) => `p${p.partition}: asked ${p.requested ?? "none"}, from ${p.oldest_available} (${p.reason})`)
    .join("; ");
  const from = meta.source === "history" ? " (in the history)" : "";
  note(`RESET (${info.reason})${from}: ${info.message} [${parts}]`);
  // Offsets of the partitions it names may start again (a recreated topic).
  const everything = info.reason === "topic_changed" || info.reason === "old_format";
  if (everything || !info.partitions?.length) newest.clear();
  else for (const p of info.partitions) newest.delete(p.partition);
}

function refused(detail) {
  const { status, error, message } = detail;
  note(`HTTP ${status} ${error ?? ""}: ${message ?? ""}`);
  if (status === 401 && error === "token_expired") {
    note("the token has expired: get a new one (make token) and start again");
  } else if (status === 401 && !args.token) {
    note("no token: set CRM_EVENTS_TOKEN (e.g. CRM_EVENTS_TOKEN=$(make token)) or pass --token");
  } else if (status === 401) {
    note("the token was refused: get a new one (make token) and start again");
  } else if (error === "invalid_cursor") {
    note("the cursor is not one this deployment can read: pass another --last-event-id or remove the state file");
  }
}

function onState(state, detail) {
  if (state === "live") {
    const url = new URL(args.url);
    note(`connected to ${url.origin}${detail.cursor ? `, after cursor ${detail.cursor}` : ""}`);
  } else if (state === "reconnecting") {
    const { status, reason } = detail;
    // A 4xx other than 429 does not get better by retrying (no token, a bad cursor, bad
    // types); the module would drop a refused cursor and go on from now, skipping what the
    // cursor asked for, so tail stops first (before the module forgets the state file's).
    if (reason === "cursor_refused" || (status >= 400 && status < 500 && status !== 429)) {
      refused(detail);
      stop(1);
    }
    if (reason === "dropped") note(`stream ended or unreachable; reconnecting (attempt ${detail.attempts})`);
    else note(`${detail.message ?? reason}; retrying in ${detail.retryInMs ?? 0} ms`);
  }
}

function onEvent(envelope, cursor) {
  const { partition, offset } = envelope;
  const last = newest.get(partition);
  if (args.contiguous && last !== undefined && offset > last + 1) {
    note(`GAP partition ${partition}: offsets ${last + 1}..${offset - 1} missing`);
  }
  newest.set(partition, offset);
  received += 1;
  process.stdout.write(
    args.json
      ? `${JSON.stringify({ cursor, ...envelope })}\n`
      : `${partition}:${offset} ${envelope.type} ${envelope.key ?? "-"}\n`,
  );
  if (stateFile && isCursor(cursor)) stateFile.setItem(DEFAULT_STORAGE_KEY, cursor);
  if (received >= wanted) stop(0);
}

client = connectCrmEvents({
  url: args.url,
  types: args.types ? args.types.split(",").map((t) => t.trim()).filter(Boolean) : null,
  lastEventId: lastEventId ?? null,
  storage,
  token: args.token?.trim() || null,
  tokenTransport: "header",
  EventSource,
  onEvent,
  onState,
  onReset: resetReport,
  onDuplicate(envelope) {
    note(`DUPLICATE partition ${envelope.partition} offset ${envelope.offset}: dropped`);
  },
});
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => stop(0));
