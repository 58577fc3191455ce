#!/usr/bin/env node
// Serve the example page next to the crm-events API, so the page and the stream share an
// origin (EventSource across origins needs CORS, which the edges only answer for listed
// origins).
//
//   CRM_EVENTS_TOKEN=$(make token) node clients/js/examples/serve.mjs
//       [--port 8090] [--upstream http://127.0.0.1:9010] [--token JWT]
//
// "/" is index.html, "/crm-events-client.js" the client (one folder up); /crm-events and
// /crm-events/history are proxied to the load balancer, streamed through unbuffered.
// Node >= 18, no dependencies.
//
// With a token (CRM_EVENTS_TOKEN, or --token), the proxied requests carry it as
// "Authorization: Bearer", so the page needs no sign-in of its own: a development setup. A
// real application would have each user's browser present that user's token (the edges also
// read it from their auth cookie) instead of one shared token added on the way.

import { createReadStream, statSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    port: { type: "string", default: process.env.PORT ?? "8090" },
    host: { type: "string", default: "127.0.0.1" },
    upstream: { type: "string", default: process.env.CRM_EVENTS_URL ?? "http://127.0.0.1:9010" },
    token: { type: "string", default: process.env.CRM_EVENTS_TOKEN || undefined },
  },
});
const here = path.dirname(fileURLToPath(import.meta.url));
const upstream = new URL(values.upstream);
const types = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8" };
// What is served, and from where: nothing else on this machine.
const files = {
  "/": path.join(here, "index.html"),
  "/index.html": path.join(here, "index.html"),
  "/crm-events-client.js": path.join(here, "..", "crm-events-client.js"),
};

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://local");
  if (url.pathname === "/crm-events" || url.pathname.startsWith("/crm-events/")) {
    const client = upstream.protocol === "https:" ? https : http;
    const headers = { ...req.headers, host: upstream.host };
    if (values.token && !headers.authorization) headers.authorization = `Bearer ${values.token.trim()}`;
    const out = client.request(
      new URL(url.pathname + url.search, upstream),
      { method: req.method, headers, rejectUnauthorized: false },
      (up) => {
        res.writeHead(up.statusCode ?? 502, up.headers);
        res.flushHeaders();
        up.pipe(res);
      },
    );
    out.on("error", (err) => {
      if (!res.headersSent) res.writeHead(502, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: "bad_gateway", message: err.message }));
    });
    res.on("close", () => out.destroy()); // the browser went away: end the upstream stream
    req.pipe(out);
    return;
  }
  const file = files[url.pathname];
  const type = file && types[path.extname(file)];
  try {
    if (!type || !statSync(file).isFile()) throw new Error("not found");
  } catch {
    res.writeHead(404, { "content-type": "application/json" });
    res.end(JSON.stringify({ error: "not_found", message: "no such file" }));
    return;
  }
  res.writeHead(200, { "content-type": type, "cache-control": "no-cache" });
  createReadStream(file).pipe(res);
});

server.listen(Number(values.port), values.host, () => {
  const { port } = server.address();
  const auth = values.token ? ", with a token" : ", no token (set CRM_EVENTS_TOKEN if the API asks for one)";
  console.log(`crm-events example on http://${values.host}:${port}/ (API: ${upstream.origin}${auth})`);
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections(); // open streams would otherwise keep it running
  });
}
