#!/usr/bin/env node
// A test driver: crm-events-client.js in Node with the `eventsource` package, the token in an
// Authorization header (tokenTransport "header", through the package's fetch option).
// tests/browser/test_js_client.py runs it against a real deployment and produces the events.
//
//   node clients/js/test/node-client.mjs --url URL --prefix P --want N [--last-event-id C]
//       [--types A,B] [--history N] [--page-size N]
//   CRM_TEST_TOKENS='["first", "then", ...]'   the first is the token to start with; each
//                                              getToken() call returns the next one
//
// stdout: one JSON object per line: {"state", "detail"}, {"getToken": calls},
// {"event": key, "seq", "partition", "offset", "source", "context"} for events whose key
// starts with P (seq: the producer's Seq field),
// {"reset": reason}, {"duplicate": key}; after N events of P, {"done": true, "cursor": C}
// and exit 0.

import { parseArgs } from "node:util";
import { EventSource } from "eventsource";
import { connectCrmEvents } from "../crm-events-client.js";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    prefix: { type: "string" },
    want: { type: "string" },
    "last-event-id": { type: "string" },
    types: { type: "string" },
    history: { type: "string", default: "0" },
    "page-size": { type: "string", default: "100" },
  },
});
const tokens = JSON.parse(process.env.CRM_TEST_TOKENS ?? "[]");
const want = Number(args.want);
const say = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
let calls = 0;
let got = 0;

const client = connectCrmEvents({
  url: args.url,
  lastEventId: args["last-event-id"],
  types: args.types ? args.types.split(",") : null,
  history: Number(args.history),
  pageSize: Number(args["page-size"]),
  token: tokens.shift() ?? null,
  async getToken() {
    calls += 1;
    say({ getToken: calls });
    const next = tokens.shift();
    if (!next) throw new Error("no more tokens");
    return next;
  },
  EventSource,
  retry: { initialMs: 200, maxMs: 1000 },
  onState(state, detail) {
    say({ state, detail });
  },
  onReset(info) {
    say({ reset: info.reason });
  },
  onDuplicate(envelope) {
    say({ duplicate: envelope.key });
  },
  onEvent(envelope, cursor, meta) {
    if (!String(envelope.key ?? "").startsWith(args.prefix)) return;
    got += 1;
    say({
      event: envelope.key,
      seq: envelope.event?.Seq ?? null,
      partition: envelope.partition,
      offset: envelope.offset,
      source: meta.source,
      context: meta.context,
    });
    if (got === want) {
      client.close();
      say({ done: true, cursor: client.cursor });
      process.exit(0);
    }
  },
});
