// Type declarations for crm-events-client.js (see README.md for what each option does).

/** An event as the stream and the history deliver it (the SSE `data:` line). */
export interface CrmEnvelope<E = Record<string, unknown>> {
  type: string;
  key: string | null;
  partition: number;
  offset: number;
  timestamp_ms: number;
  /** The producer's object, unchanged. */
  event: E;
}

/** One partition named by a reset; positions are Kafka's "next offset". */
export interface CrmResetPartition {
  partition: number;
  requested: number | null;
  oldest_available: number | null;
  reason: CrmResetReason;
}

export type CrmResetReason = "trimmed" | "not_retained" | "topic_changed" | "old_format";

/** The data of `event: reset` (and a history page's `reset`). */
export interface CrmResetInfo {
  reason: CrmResetReason;
  partitions: CrmResetPartition[];
  message: string;
}

export interface CrmEventMeta {
  /** "history": from a history page (a start's backfill, or after a reset); "stream": live or replayed. */
  source: "history" | "stream";
  /** From the newest page before the cursor, shown for context on a start (`history` option), only when the catch-up after the cursor reached the end. */
  context: boolean;
}

export type CrmState = "connecting" | "live" | "reconnecting" | "closed";

export interface CrmStateDetail {
  /** Failed attempts since the stream was last open, each counted once (on "live": how many it took). */
  attempts?: number;
  /** When the next attempt starts ("reconnecting" after a refusal). */
  retryInMs?: number;
  /** Why: "dropped", "refused", "unauthorized", "token_expired" (a stream ended by auth_expired within seconds of opening, again: the next attempt waits), "cursor_refused", "get_token_failed" (getToken() failed, gave nothing, or gave a token already past its exp), "reset", "types", … */
  reason?: string;
  /** The HTTP status that refused the stream or the history, when known. */
  status?: number | null;
  /** The API's error code (e.g. "unauthorized", "invalid_cursor", "token_expired"). */
  error?: string | null;
  message?: string;
  /** The backfill the connection starts with ("connecting"). */
  backfill?: "start" | "after" | null;
  cursor?: string | null;
}

/** The part of Web Storage the client uses (sessionStorage, localStorage, or your own). */
export interface CrmCursorStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** What the client needs of an EventSource: the browser's, or the eventsource package's. */
export interface CrmEventSourceLike {
  readonly readyState: number;
  onopen: ((ev: any) => unknown) | null;
  onmessage: ((ev: MessageEvent) => unknown) | null;
  onerror: ((ev: any) => unknown) | null;
  addEventListener(type: string, listener: (ev: MessageEvent) => unknown): void;
  close(): void;
}

export interface CrmEventSourceConstructor {
  new (url: string, init?: { withCredentials?: boolean; fetch?: CrmFetch }): CrmEventSourceLike;
}

export type CrmFetch = (input: string | URL, init?: any) => Promise<any>;

export type CrmTokenTransport = "cookie" | "query" | "header";

export interface CrmEventsOptions<E = Record<string, unknown>> {
  /** The stream (default "/crm-events" of this page's origin; absolute in Node). */
  url?: string | URL;
  /** The history endpoint (default: the stream's path + "/history"). */
  historyUrl?: string | URL | null;
  /** Server-side filter (?types=); null or empty for every type the token grants. */
  types?: readonly string[] | null;
  /** Start after this cursor (default: the stored one, else from now). */
  lastEventId?: string | null;
  /** Where the cursor is kept (default sessionStorage when there is one; null: nowhere). */
  storage?: CrmCursorStorage | null;
  /** Default "crm-events:cursor"; a filtered client keeps its cursor under `cursorStorageKey(types, storageKey)`. */
  storageKey?: string;
  /** On start, first hand over up to this many of the newest stored events (0: none). */
  history?: number;
  /** Events per history request (default 100; at most the edge's CRM_EVENTS_HISTORY_MAX_N). */
  pageSize?: number;
  /** At most this many events come from history after a cursor (a start with `history`, a reset); the stream replays the rest. 0 disables the backfill after a reset. Default 1000. */
  backfillLimit?: number;
  /** A token to start with. */
  token?: string | null;
  /** Called for a new token: before the first request when there is none ("query", "header"), on `auth_expired`, and when the edge answers 401. */
  getToken?: (() => Promise<string> | string) | null;
  /** How the token reaches the edge (default "cookie" in a browser, "header" elsewhere). */
  tokenTransport?: CrmTokenTransport;
  /** The edge's auth cookie (CRM_EVENTS_AUTH_COOKIE; default "crm_events_token"). */
  cookieName?: string;
  /** Send cookies to another origin (EventSource withCredentials, fetch credentials "include"). */
  withCredentials?: boolean;
  /** Backoff after a refusal: from initialMs (default 1000) doubling up to maxMs (default 15000), with jitter. */
  retry?: { initialMs?: number; maxMs?: number };
  onEvent?: (envelope: CrmEnvelope<E>, cursor: string, meta: CrmEventMeta) => void;
  onReset?: (info: CrmResetInfo, meta: { source: "history" | "stream" }) => void;
  onState?: (state: CrmState, detail: CrmStateDetail) => void;
  /** An event at or below the newest offset already handed over in its partition (dropped). */
  onDuplicate?: (envelope: CrmEnvelope<E>, cursor: string) => void;
  /** Default globalThis.EventSource; in Node, the eventsource package's. */
  EventSource?: CrmEventSourceConstructor;
  /** Default globalThis.fetch. */
  fetch?: CrmFetch;
}

export interface CrmEventsClient {
  /** The newest cursor: everything up to it was handed over (opaque). */
  readonly cursor: string | null;
  readonly state: CrmState | null;
  readonly types: string[] | null;
  /** Reconnect with another filter: after the cursor, or (restart) from the newest history. */
  setTypes(types: readonly string[] | null, options?: { restart?: boolean }): void;
  /** Reconnect now when not live (e.g. on the browser's `online` event). */
  reconnect(): void;
  close(): void;
}

export declare const DEFAULT_COOKIE_NAME: string;
export declare const DEFAULT_STORAGE_KEY: string;

export declare class CrmEventsHttpError extends Error {
  constructor(status: number, error?: string | null, message?: string | null);
  readonly status: number;
  readonly error: string | null;
  readonly detail: string | null;
}

export declare function connectCrmEvents<E = Record<string, unknown>>(
  options?: CrmEventsOptions<E>,
): CrmEventsClient;

export declare function isCursor(text: unknown): text is string;

/** Where a cursor of this filter is kept: `storageKey` for every type, else `storageKey:` + the sorted, de-duplicated types. */
export declare function cursorStorageKey(
  types: readonly string[] | null | undefined,
  storageKey?: string,
): string;

export interface CrmPartitionTracker {
  seen(envelope: { partition: number; offset: number }): boolean;
  forget(partitions: readonly number[] | null): void;
}

export declare function partitionTracker(): CrmPartitionTracker;

export declare function tokenExpiry(token: string): number | null;

export declare function setTokenCookie(
  token: string,
  options?: { name?: string; path?: string },
): boolean;
