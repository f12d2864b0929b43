// comet.js: a small browser client for the comet protocol 1.1 (JSON text
// mode over WebSocket; docs/PROTOCOL.md). A standalone ES module with no
// dependencies; web/README.md documents its API.

/** Operation codes (PROTOCOL.md section 2). */
export const Op = Object.freeze({
  HEARTBEAT: 2,
  HEARTBEAT_REPLY: 3,
  AUTH: 7,
  AUTH_REPLY: 8,
  BATCH: 9,
  SEND_USER: 18,
  SEND_USER_REPLY: 19,
  SEND_GROUP: 20,
  SEND_GROUP_REPLY: 21,
  SYNC: 22,
  SYNC_REPLY: 23,
});

/** Conversation kinds: a direct (1:1) conversation or a group. */
export const KIND = Object.freeze({ USER: 18, GROUP: 20 });
/** Alias of KIND. */
export const Kind = KIND;

/** Connection states, in the order a healthy connection goes through them. */
export const STATE = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});
/** Alias of STATE. */
export const State = STATE;

/** The login was refused (wrong mid or mkey): the client does not retry. */
export class AuthError extends Error {
  constructor(message) {
    super(message);
    this.name = "AuthError";
    this.code = "auth";
  }
}

/** A send or sync the server answered with ret -1, or that never got an answer. */
export class RequestError extends Error {
  constructor(message) {
    super(message);
    this.name = "RequestError";
  }
}

/** The key of a conversation: "u:<mid>" (direct) or "g:<group id>". */
export function conversationKey(kind, id) {
  return `${kind === Kind.GROUP ? "g" : "u"}:${id}`;
}

/** Bytes to standard padded base64. */
export function bytesToBase64(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

/** Standard base64 to bytes (throws on bad input). */
export function base64ToBytes(text) {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

const DEFAULTS = {
  path: "/sub",
  heartbeatMs: 30000,
  requestTimeoutMs: 15000,
  backoffMinMs: 500,
  backoffMaxMs: 15000,
  syncPageSize: 100,
  // Kept per conversation to drop duplicates that arrive out of order.
  maxAhead: 1000,
};

/**
 * One logged-in user's connection to a comet server.
 *
 * Events (an EventTarget; every event is a CustomEvent, data in `detail`):
 * - `state`   {state, previous, error?}: see State;
 * - `message` a Message (see README.md), once per chatId per conversation;
 * - `synced`  {kind, to, head, oldest, lost}: a conversation is up to date.
 */
export class CometClient extends EventTarget {
  /**
   * @param {{mid: number, mkey: string, url?: string, path?: string,
   *          heartbeatMs?: number, requestTimeoutMs?: number,
   *          backoffMinMs?: number, backoffMaxMs?: number,
   *          syncPageSize?: number, extra?: object}} options
   */
  constructor(options) {
    super();
    this.options = { ...DEFAULTS, ...options };
    if (!Number.isInteger(this.options.mid) || this.options.mid < 1) {
      throw new TypeError("mid must be a positive integer");
    }
    this.mid = this.options.mid;
    this.url = this.options.url ?? defaultUrl(this.options.path);
    this.state = State.IDLE;
    this._ws = null;
    this._seq = 0;
    this._pending = new Map(); // seq -> {resolve, reject, timer}
    this._conversations = new Map(); // key -> {kind, to, last, ahead:Set}
    this._attempt = 0;
    this._beat = null;
    this._retry = null;
    this._firstLogin = null;
    this._syncing = new Set();
    for (const c of this.options.conversations || []) this.track(c.kind, c.to, c.last || 0);
  }

  /**
   * Connects and logs in. Resolves with the op 8 reply body on the first
   * successful login; rejects with AuthError when the login is refused (no
   * retry), or with an Error when the first connection fails. After a
   * login, dropped connections are re-established with backoff.
   */
  connect() {
    if (this.state === State.CLOSED) throw new Error("client is closed");
    if (!this._firstLogin) {
      this._firstLogin = deferred();
      this._open();
    }
    return this._firstLogin.promise;
  }

  /** Closes the connection for good (no reconnect). */
  close() {
    clearTimeout(this._retry);
    this._stopBeat();
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000, "bye");
    this._failPending(new RequestError("client closed"));
    this._setState(State.CLOSED);
  }

  /**
   * Registers a conversation whose messages after `last` are known, so that
   * every (re)connection syncs it. Returns nothing; see sync() for one now.
   */
  track(kind, to, last = 0) {
    const c = this._conversation(kind, to);
    if (last > c.last) {
      c.last = last;
      c.ahead = new Set([...c.ahead].filter((id) => id > last));
    }
  }

  /** The highest chatId held without a gap for a conversation (0: none). */
  lastChatId(kind, to) {
    return this._conversations.get(conversationKey(kind, to))?.last ?? 0;
  }

  /**
   * Sends to user `to` (op 18). `msg` is a string (sent as UTF-8) or a
   * Uint8Array (sent base64). Resolves {chatId} on ret 0, rejects
   * RequestError with the server's reason otherwise.
   */
  sendToUser(to, msg) {
    return this._send(Op.SEND_USER, to, msg);
  }

  /** Sends to group `to` (op 20); as sendToUser. */
  sendToGroup(to, msg) {
    return this._send(Op.SEND_GROUP, to, msg);
  }

  /**
   * Syncs one conversation (op 22): asks for what comes after its last
   * chatId, page by page, until the server's head is reached. Replayed
   * messages arrive as `message` events. Resolves {head, oldest, lost}
   * (lost: messages the store no longer keeps).
   */
  async sync(kind, to) {
    const c = this._conversation(kind, to);
    let lost = 0;
    for (;;) {
      const after = c.last;
      const reply = await this._request(Op.SYNC, {
        kind,
        to,
        after,
        limit: this.options.syncPageSize,
      });
      if (reply.ret !== 0) throw new RequestError(reply.error || "sync refused");
      if (reply.oldest > after + 1 && reply.oldest <= reply.head + 1) {
        // Gone for good: skip the hole so that the next page asks past it.
        lost += reply.oldest - after - 1;
        this._advance(c, reply.oldest - 1);
      }
      if (c.last >= reply.head || c.last === after) {
        const detail = { kind, to, head: reply.head, oldest: reply.oldest, lost };
        this._emit("synced", detail);
        return detail;
      }
    }
  }

  // --- internals -------------------------------------------------------

  _open() {
    this._setState(this._attempt === 0 ? State.CONNECTING : State.RECONNECTING);
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (e) {
      this._dropped(e);
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._login(ws);
    ws.onmessage = (ev) => this._frame(ws, ev.data);
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._dropped(new Error(`connection closed (${ev.code}${ev.reason ? ": " + ev.reason : ""})`));
    };
    ws.onerror = () => {}; // onclose follows and decides.
  }

  async _login(ws) {
    const body = { ...(this.options.extra || {}), mid: this.mid, mkey: this.options.mkey };
    let reply;
    try {
      reply = await this._request(Op.AUTH, body, ws);
    } catch (e) {
      return; // the close handler retries
    }
    if (reply.ret !== 0) {
      const error = new AuthError(reply.error || "login refused");
      this._ws = null;
      ws.close();
      this._failPending(error);
      this._setState(State.CLOSED, error);
      this._emit("autherror", { error });
      if (this._firstLogin) this._firstLogin.reject(error);
      return;
    }
    const first = this._attempt === 0;
    this._attempt = 0;
    this._startBeat(ws);
    this._setState(State.OPEN);
    if (this._firstLogin) this._firstLogin.resolve(reply);
    if (!first || this._conversations.size > 0) this._syncAll();
  }

  _syncAll() {
    for (const c of this._conversations.values()) this._syncSoon(c);
  }

  _syncSoon(c) {
    const key = conversationKey(c.kind, c.to);
    if (this._syncing.has(key)) return;
    this._syncing.add(key);
    this.sync(c.kind, c.to)
      .catch(() => {}) // a dropped connection syncs again on reconnect
      .finally(() => this._syncing.delete(key));
  }

  _dropped(error) {
    this._stopBeat();
    this._failPending(new RequestError("connection lost"));
    if (this.state === State.CLOSED) return;
    if (this._firstLogin && this.state !== State.OPEN && this._attempt === 0 && !this._everOpen) {
      // Never got in: report it rather than retry blindly.
      this._setState(State.CLOSED, error);
      this._firstLogin.reject(error);
      return;
    }
    this._attempt += 1;
    const { backoffMinMs, backoffMaxMs } = this.options;
    const ceiling = Math.min(backoffMaxMs, backoffMinMs * 2 ** (this._attempt - 1));
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this._setState(State.RECONNECTING, error, delay);
    clearTimeout(this._retry);
    this._retry = setTimeout(() => this._open(), delay);
  }

  _frame(ws, data) {
    if (typeof data !== "string") return; // text mode only
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    switch (f.op) {
      case Op.BATCH:
        for (const inner of f.body || []) this._delivered(inner);
        break;
      case Op.AUTH_REPLY:
      case Op.SEND_USER_REPLY:
      case Op.SEND_GROUP_REPLY:
      case Op.SYNC_REPLY:
      case Op.HEARTBEAT_REPLY: {
        const p = this._pending.get(f.seq);
        if (p) {
          this._pending.delete(f.seq);
          clearTimeout(p.timer);
          p.resolve(f.body ?? {});
        }
        break;
      }
      default:
        this._emit("frame", f); // application ops
    }
  }

  _delivered(frame) {
    const b = frame.body;
    if (!b || (frame.op !== Op.SEND_USER && frame.op !== Op.SEND_GROUP)) return;
    const kind = frame.op;
    // A direct conversation is named by the other party.
    const peer = kind === Op.SEND_GROUP ? b.to : b.from === this.mid ? b.to : b.from;
    const c = this._conversation(kind, peer);
    const id = b.chatId;
    if (id <= c.last || c.ahead.has(id)) return; // a duplicate (live and replay)
    let gap = false;
    if (id === c.last + 1) {
      this._advance(c, id);
    } else {
      c.ahead.add(id);
      if (c.ahead.size > this.options.maxAhead) this._advance(c, Math.min(...c.ahead));
      gap = true;
    }
    const message = {
      kind,
      conversation: conversationKey(kind, peer),
      peer,
      chatId: id,
      from: b.from,
      to: b.to,
      mine: b.from === this.mid,
      ...decode(b),
    };
    this._emit("message", message);
    if (gap && this.state === State.OPEN) this._syncSoon(c);
  }

  _advance(c, to) {
    if (to > c.last) c.last = to;
    for (const id of c.ahead) if (id <= c.last) c.ahead.delete(id);
    while (c.ahead.has(c.last + 1)) {
      c.ahead.delete(c.last + 1);
      c.last += 1;
    }
  }

  _conversation(kind, to) {
    if (kind !== Kind.USER && kind !== Kind.GROUP) throw new TypeError("kind must be 18 or 20");
    if (!Number.isInteger(to) || to < 1) throw new TypeError("id must be a positive integer");
    const key = conversationKey(kind, to);
    let c = this._conversations.get(key);
    if (!c) {
      c = { kind, to, last: 0, ahead: new Set() };
      this._conversations.set(key, c);
    }
    return c;
  }

  async _send(op, to, msg) {
    if (!Number.isInteger(to) || to < 1) throw new TypeError("id must be a positive integer");
    const body = { from: this.mid, to };
    if (msg instanceof Uint8Array) {
      body.msg = bytesToBase64(msg);
      body.enc = "base64";
    } else {
      body.msg = String(msg);
    }
    const reply = await this._request(op, body);
    if (reply.ret !== 0) throw new RequestError(reply.error || "send refused");
    // Our own message is never delivered back to this connection: count
    // it as held so that a sync does not replay it as news.
    const c = this._conversation(op, to);
    if (reply.chatId === c.last + 1) this._advance(c, reply.chatId);
    else if (reply.chatId > c.last) c.ahead.add(reply.chatId);
    return { chatId: reply.chatId };
  }

  _request(op, body, ws = this._ws) {
    if (!ws || ws.readyState !== WebSocket.OPEN || (op !== Op.AUTH && this.state !== State.OPEN)) {
      return Promise.reject(new RequestError("not connected"));
    }
    this._seq = (this._seq % 0x7fffffff) + 1;
    const seq = this._seq;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(seq);
        reject(new RequestError("no reply in time"));
      }, this.options.requestTimeoutMs);
      this._pending.set(seq, { resolve, reject, timer });
      ws.send(JSON.stringify({ ver: 1, op, seq, body }));
    });
  }

  _failPending(error) {
    for (const p of this._pending.values()) {
      clearTimeout(p.timer);
      p.reject(error);
    }
    this._pending.clear();
  }

  _startBeat(ws) {
    this._stopBeat();
    this._everOpen = true;
    this._beat = setInterval(() => {
      this._request(Op.HEARTBEAT, undefined, ws).catch(() => {
        // No answer within the request timeout: the link is dead.
        if (this._ws === ws) ws.close(4000, "heartbeat timeout");
      });
    }, this.options.heartbeatMs);
  }

  _stopBeat() {
    clearInterval(this._beat);
    this._beat = null;
  }

  _setState(state, error, delayMs) {
    if (state === this.state && delayMs === undefined) return;
    const previous = this.state;
    this.state = state;
    this._emit("state", { state, previous, error, delayMs });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

function decode(body) {
  if (body.enc === "base64") {
    // Bytes that are valid UTF-8 may travel base64 too (control characters):
    // show them as text when they decode, as base64 otherwise.
    let bytes;
    try {
      bytes = base64ToBytes(body.msg);
    } catch {
      return { text: null, base64: body.msg, msg: body.msg };
    }
    try {
      const text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
      return { text, base64: body.msg, msg: body.msg, bytes };
    } catch {
      return { text: null, base64: body.msg, msg: body.msg, bytes };
    }
  }
  return { text: body.msg, base64: null, msg: body.msg };
}

function defaultUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}
