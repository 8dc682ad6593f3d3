// Hand-written types for web/taskwire.js (the taskwire client). See docs/CLIENT.md.

/** Error codes: the server's (PROTOCOL.md) and the client's own (-32098, -32099). */
export declare const ErrorCode: Readonly<{
  PARSE_ERROR: -32700;
  INVALID_REQUEST: -32600;
  METHOD_NOT_FOUND: -32601;
  INVALID_PARAMS: -32602;
  INTERNAL_ERROR: -32603;
  CANCELLED: -32800;
  OVERLOADED: -32001;
  DEADLINE_EXCEEDED: -32002;
  CRASHED: -32003;
  KILLED: -32004;
  SHUTTING_DOWN: -32005;
  /** The cluster node running the task was lost; the task may have run in part. */
  NODE_LOST: -32008;
  /** A WebAssembly task passed its memory limit. */
  MEMORY_LIMIT: -32010;
  /** A WebAssembly task trapped (unreachable, out-of-bounds access, stack overflow, ...). */
  TRAPPED: -32011;
  /** No such session: unknown, expired, already resumed, or other credentials. */
  NO_SUCH_SESSION: -32020;
  /** The result was dropped: the session's buffer was full while the client was away (the task did run). */
  RESULT_DROPPED: -32021;
  /** Client-side: the connection dropped while the request was in flight. */
  CONNECTION_LOST: -32099;
  /** Client-side: the request was never sent (closed, reconnect off/gave up, queue full). */
  NOT_CONNECTED: -32098;
}>;

export type ErrorCodeName = keyof typeof ErrorCode;

/** A JSON-RPC error from the server, or one of the client's own (-32098, -32099). */
export declare class TaskwireError extends Error {
  constructor(code: number, message: string, data?: unknown);
  readonly name: 'TaskwireError';
  readonly code: number;
  readonly data: any;
  /** e.g. "CANCELLED", or undefined for a code this client does not know. */
  readonly codeName: ErrorCodeName | undefined;
  toJSON(): { code: number; message: string; data: any };
}

export interface ReconnectOptions {
  /** First delay before reconnecting. Default 250. */
  initialDelayMs?: number;
  /** Upper bound of the delay. Default 10000. */
  maxDelayMs?: number;
  /** Growth per attempt. Default 2. */
  factor?: number;
  /** 0..1: each delay is `delay * (1 - jitter * Math.random())`. Default 0.5. */
  jitter?: number;
  /** Attempts before giving up (state becomes "closed"). Default Infinity. */
  maxRetries?: number;
}

export interface SessionOptions {
  /** Ask for a shorter window than the server's (ms). */
  windowMs?: number;
  /** Keep the token in `sessionStorage` (or `storage`) so that a page reload resumes too. Off by default: see docs/CLIENT.md. */
  persist?: boolean;
  /** Where to keep it when `persist` is on. Default `globalThis.sessionStorage`. */
  storage?: Pick<Storage, 'getItem' | 'setItem' | 'removeItem'>;
  /** The storage key. Default `"taskwire.session " + url`. */
  key?: string;
}

export interface ConnectOptions {
  /** Sent as the `?token=` query parameter (browsers cannot set WebSocket headers). */
  token?: string;
  /** true (default): reconnect with the default backoff; false: never; or tune it. */
  reconnect?: boolean | ReconnectOptions;
  /** Subprotocols to offer. Default ["taskwire.v1"]. */
  protocols?: string | string[];
  /** A WebSocket constructor, for Node < 22 (e.g. `import WebSocket from 'ws'`). Default globalThis.WebSocket. */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocket;
  /** Calls (frames) kept while disconnected and sent on reconnect; beyond it they reject NOT_CONNECTED. 0 disables queueing. Default 100. */
  queueLimit?: number;
  /** Give up on one opening attempt after this long. Default 10000. */
  connectTimeoutMs?: number;
  /** Open a session: after a drop that was not this client's close(), reconnect, resume, and settle every pending call with its real outcome, exactly once. Default off. */
  session?: boolean | SessionOptions;
  /** Send `$/ping` every this many ms; no frame at all (any answer counts, even an error) for a whole interval after a ping closes the socket (code 4000) and reconnects. 0 disables. Default 30000. */
  heartbeatMs?: number;
}

export interface CallOptions<P = any> {
  /** Aborting sends `$/cancelRequest`; the call rejects with the server's -32800 (or resolves if it finished first). */
  signal?: AbortSignal;
  /** Opt in to progress: the client adds `params._meta.progressToken` and routes `$/progress` here. */
  onProgress?: (value: P) => void;
  /** A server-side deadline: `params._meta.timeoutMs`. Past it the call rejects with -32002. */
  timeoutMs?: number;
}

export interface BatchItem {
  method: string;
  params?: Record<string, unknown>;
  /** Send without an id: no answer; its outcome is `{ ok: true, result: undefined }`. */
  notification?: boolean;
  onProgress?: (value: any) => void;
  timeoutMs?: number;
}

export type Outcome<T = any> = { ok: true; result: T } | { ok: false; error: TaskwireError };

export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface TaskwireEventMap {
  open: CustomEvent<{ reconnected: boolean; protocol: string }>;
  close: CustomEvent<{ code: number; reason: string; wasClean: boolean; gaveUp?: boolean }>;
  reconnecting: CustomEvent<{ attempt: number; delayMs: number; code: number; reason: string }>;
  state: CustomEvent<{ state: ConnectionState; previous: ConnectionState }>;
  /** A server notification other than `$/progress`. */
  notification: CustomEvent<{ method: string; params: any }>;
  /** A session opened, was resumed after a drop, or was gone when the client came back (pending calls then rejected with -32020). */
  session: CustomEvent<{ state: 'open' | 'resumed' | 'expired'; session?: string; replayed?: number; running?: number; resent?: number }>;
  /** A kept answer arrived for which no call waits (a persisted session after a page reload). */
  replayed: CustomEvent<{ response: { id: number | string; result?: any; error?: { code: number; message: string; data?: any } } }>;
  /** An error not tied to a call: an id-null error response, an unparsable frame, a throwing onProgress. */
  error: CustomEvent<{ error?: unknown; response?: unknown; data?: unknown }>;
}

export declare class Taskwire extends EventTarget {
  /** Resolves once the first WebSocket is open; rejects with NOT_CONNECTED if that attempt fails. In a browser `url` defaults to `/ws` of the page's origin; http(s) URLs are turned into ws(s). */
  static connect(url?: string | URL, options?: ConnectOptions): Promise<Taskwire>;
  constructor(url?: string | URL, options?: ConnectOptions);

  readonly url: string;
  readonly state: ConnectionState;
  /** The subprotocol the server selected ("" if none). */
  readonly protocol: string;
  /** Calls not yet settled (sent or queued). */
  readonly inflight: number;
  /** Frames waiting for the connection to come back. */
  readonly queued: number;
  /** The session's id while one is open (option `session`), else null. */
  readonly session: string | null;

  call<T = any>(method: string, params?: Record<string, unknown>, options?: CallOptions): Promise<T>;
  /** No id, no answer. Throws NOT_CONNECTED if closed or the queue is full. */
  notify(method: string, params?: Record<string, unknown>): void;
  /** One JSON-RPC batch frame; resolves with one outcome per item, in order, once all settle. */
  batch(items: BatchItem[], options?: { signal?: AbortSignal }): Promise<Outcome[]>;
  /** Close for good: no reconnect; unsettled calls reject (-32099 if sent, -32098 if queued). */
  close(code?: number, reason?: string): void;

  addEventListener<K extends keyof TaskwireEventMap>(
    type: K, listener: (ev: TaskwireEventMap[K]) => void, options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof TaskwireEventMap>(
    type: K, listener: (ev: TaskwireEventMap[K]) => void, options?: boolean | EventListenerOptions): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions): void;
}

export default Taskwire;
