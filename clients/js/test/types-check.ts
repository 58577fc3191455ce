// Compiled by `tsc --noEmit -p clients/js/test` (tests/browser/test_js_client.py): a consumer
// written against crm-events-client.d.ts, the way a TypeScript application uses the client.
// The @ts-expect-error lines must stay errors: if the declarations stopped catching these
// mistakes, tsc would fail on an unused @ts-expect-error.
import { EventSource } from "eventsource";
import {
  connectCrmEvents,
  cursorStorageKey,
  CrmEventsHttpError,
  isCursor,
  setTokenCookie,
  type CrmEnvelope,
  type CrmEventsClient,
  type CrmResetInfo,
  type CrmState,
} from "../crm-events-client.js";

interface Deal {
  DealId: string;
  Amount: number;
}

const states: CrmState[] = [];
const client: CrmEventsClient = connectCrmEvents<Deal>({
  url: "https://crm.example/crm-events",
  types: ["DealWon", "DealLost"],
  history: 50,
  storage: null,
  getToken: async () => "jwt",
  tokenTransport: "header",
  EventSource,
  retry: { initialMs: 500, maxMs: 10_000 },
  onEvent(envelope: CrmEnvelope<Deal>, cursor, meta) {
    const amount: number = envelope.event.Amount;
    const where = `${envelope.partition}:${envelope.offset} ${cursor} ${meta.source}`;
    void [amount, where, meta.context];
  },
  onReset(info: CrmResetInfo, meta) {
    for (const p of info.partitions) void [p.partition, p.oldest_available, meta.source];
  },
  onState(state, detail) {
    states.push(state);
    void [detail.attempts, detail.status, detail.retryInMs];
  },
});

client.setTypes(["TicketOpened"], { restart: true });
client.setTypes(null);
const cursor: string | null = client.cursor;
if (isCursor(cursor)) void cursor.length;
const where: string = cursorStorageKey(client.types, "my-app:cursor");
void where;
client.close();
void [setTokenCookie, new CrmEventsHttpError(401, "unauthorized", "no token").status];

// A browser's own EventSource fits too (with the auth cookie, or ?access_token=).
connectCrmEvents({ EventSource: globalThis.EventSource, tokenTransport: "query", token: "jwt" });

// @ts-expect-error: tokenTransport is one of "cookie", "query" and "header"
connectCrmEvents({ tokenTransport: "bearer" });

connectCrmEvents<Deal>({
  // @ts-expect-error: the event's fields are typed: Amount is a number
  onEvent: (envelope) => envelope.event.Amount.toUpperCase(),
});

// @ts-expect-error: types is a list of type names, not one comma-separated string
client.setTypes("DealWon,DealLost");
