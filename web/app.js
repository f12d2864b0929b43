// The comet web chat: a single page over comet.js. Known conversations and
// the last chatId of each are kept in localStorage (per member id), so that
// a reload syncs them with op 22; the signed-in member is kept in
// sessionStorage (this tab only) so that a reload signs in again.

import { CometClient, KIND, STATE, conversationKey } from "./comet.js";

/** Messages of recent history fetched again at sign-in, per conversation. */
const HISTORY = 30;
/** Messages kept in the page per conversation. */
const MAX_SHOWN = 500;

const $ = (id) => document.getElementById(id);

let client = null;
let me = 0;
/** key -> { kind, to, last, read, messages: [] } */
let convs = new Map();
let current = null;
let localId = 0;

function storageKey(mid) {
  return `comet.chat.v1.${mid}`;
}

function loadConversations(mid) {
  const out = new Map();
  try {
    const saved = JSON.parse(localStorage.getItem(storageKey(mid)) || "{}");
    for (const c of saved.conversations || []) {
      if ((c.kind === KIND.USER || c.kind === KIND.GROUP) && c.to > 0) {
        out.set(conversationKey(c.kind, c.to), {
          kind: c.kind,
          to: c.to,
          last: c.last | 0,
          read: c.read | 0,
          messages: [],
        });
      }
    }
  } catch {
    // a broken entry: start afresh
  }
  return out;
}

function save() {
  if (!me) return;
  const conversations = [...convs.values()].map((c) => ({
    kind: c.kind,
    to: c.to,
    last: c.last,
    read: c.read,
  }));
  localStorage.setItem(storageKey(me), JSON.stringify({ conversations }));
}

function conversation(kind, to) {
  const key = conversationKey(kind, to);
  let c = convs.get(key);
  if (!c) {
    c = { kind, to, last: 0, read: 0, messages: [] };
    convs.set(key, c);
  }
  return c;
}

function title(c) {
  if (c.kind === KIND.GROUP) return `Group ${c.to}`;
  return c.to === me ? "Notes to self" : `User ${c.to}`;
}

function unread(c) {
  return c.messages.filter((m) => m.chatId > c.read && m.from !== me).length;
}

/** Avatar colours, all readable under white text. */
const PALETTE = ["#6366f1", "#0ea5e9", "#10b981", "#f97316", "#e11d48", "#8b5cf6", "#db2777", "#0d9488"];

function colour(text) {
  let h = 0;
  for (const ch of text) h = (h * 31 + ch.charCodeAt(0)) % 9973;
  return PALETTE[h % PALETTE.length];
}

function paintAvatar(el, label, seed) {
  el.textContent = label;
  el.style.background = colour(seed);
}

function avatarLabel(c) {
  return c.kind === KIND.GROUP ? "#" : String(c.to).slice(-2);
}

// ---- rendering ---------------------------------------------------------

function renderList() {
  const list = $("conv-list");
  list.replaceChildren();
  const sorted = [...convs.entries()].sort((a, b) => lastActivity(b[1]) - lastActivity(a[1]));
  for (const [key, c] of sorted) {
    const li = document.createElement("li");
    li.className = "conv" + (key === current ? " active" : "");
    li.dataset.key = key;
    const avatar = document.createElement("div");
    avatar.className = "avatar";
    paintAvatar(avatar, avatarLabel(c), key);
    const body = document.createElement("div");
    body.className = "conv-body";
    const name = document.createElement("div");
    name.className = "conv-name";
    name.textContent = title(c);
    const preview = document.createElement("div");
    preview.className = "conv-preview";
    const lastMsg = c.messages[c.messages.length - 1];
    preview.textContent = lastMsg ? (lastMsg.from === me ? "You: " : "") + previewText(lastMsg) : "No messages yet";
    body.append(name, preview);
    li.append(avatar, body);
    const n = unread(c);
    if (n > 0) {
      const badge = document.createElement("span");
      badge.className = "unread";
      badge.textContent = String(n);
      li.append(badge);
    }
    li.addEventListener("click", () => open(key));
    list.append(li);
  }
  $("conv-empty").hidden = convs.size > 0;
  const total = [...convs.values()].reduce((s, c) => s + unread(c), 0);
  document.title = total > 0 ? `(${total}) comet chat` : "comet chat";
}

function lastActivity(c) {
  const m = c.messages[c.messages.length - 1];
  return m ? m.at : 0;
}

function previewText(m) {
  return m.text === null ? `[binary] ${m.msg}` : m.text;
}

function renderPane() {
  const c = current && convs.get(current);
  $("composer").hidden = !c;
  const box = $("messages");
  box.replaceChildren();
  if (!c) {
    $("pane-title").textContent = "Select a conversation";
    $("pane-sub").textContent = "";
    $("peer-avatar").hidden = true;
    return;
  }
  $("peer-avatar").hidden = false;
  paintAvatar($("peer-avatar"), avatarLabel(c), current);
  $("pane-title").textContent = title(c);
  $("pane-sub").textContent = c.kind === KIND.GROUP ? `group id ${c.to}` : `member id ${c.to}`;
  for (const m of c.messages) box.append(bubble(c, m));
  box.scrollTop = box.scrollHeight;
}

function bubble(c, m) {
  const mine = m.from === me;
  const row = document.createElement("div");
  row.className = "msg" + (mine ? " mine" : "") + (m.failed ? " failed" : "") + (m.pending ? " pending" : "");
  if (m.chatId) row.dataset.chatId = String(m.chatId);
  if (c.kind === KIND.GROUP && !mine) {
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = `User ${m.from}`;
    row.append(who);
  }
  const text = document.createElement("div");
  text.className = "text";
  if (m.text === null) {
    row.classList.add("binary");
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = "base64";
    const code = document.createElement("code");
    code.textContent = m.msg;
    text.append(tag, code);
  } else {
    text.textContent = m.text;
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = m.failed ? `not sent: ${m.failed}` : m.pending ? "sending…" : `#${m.chatId}`;
  row.append(text, meta);
  return row;
}

function renderState(detail) {
  const el = $("conn-state");
  el.dataset.state = detail.state;
  const text = {
    [STATE.IDLE]: "offline",
    [STATE.CONNECTING]: "connecting…",
    [STATE.OPEN]: "online",
    [STATE.RECONNECTING]: detail.delayMs ? `reconnecting in ${Math.ceil(detail.delayMs / 1000)} s…` : "reconnecting…",
    [STATE.CLOSED]: "offline",
  }[detail.state];
  el.querySelector(".conn-text").textContent = text;
}

// ---- actions -------------------------------------------------------------

function open(key) {
  current = key;
  const c = convs.get(key);
  if (c) markRead(c);
  renderList();
  renderPane();
  $("composer-text").focus();
}

function markRead(c) {
  const top = c.messages.reduce((m, x) => Math.max(m, x.chatId || 0), 0);
  if (top > c.read) {
    c.read = top;
    save();
  }
}

function visible(c) {
  return current === conversationKey(c.kind, c.to) && document.visibilityState === "visible";
}

function insert(c, m) {
  const i = c.messages.findIndex((x) => x.chatId && x.chatId > m.chatId);
  if (i < 0) c.messages.push(m);
  else c.messages.splice(i, 0, m);
  if (m.chatId > c.last) c.last = m.chatId;
  // The page keeps the newest messages only; older ones stay on the server.
  if (c.messages.length > MAX_SHOWN) c.messages.splice(0, c.messages.length - MAX_SHOWN);
}

function onMessage(m) {
  const c = conversation(m.kind, m.peer);
  insert(c, { chatId: m.chatId, from: m.from, text: m.text, msg: m.msg, at: Date.now() });
  if (m.from === me || visible(c)) markRead(c);
  save();
  renderList();
  if (current === conversationKey(c.kind, c.to)) renderPane();
}

async function send(event) {
  event.preventDefault();
  const input = $("composer-text");
  const text = input.value;
  const c = current && convs.get(current);
  if (!c || text.trim() === "") return;
  input.value = "";
  $("send-error").hidden = true;
  const m = { id: ++localId, chatId: 0, from: me, text, msg: text, pending: true, at: Date.now() };
  c.messages.push(m);
  renderPane();
  renderList();
  try {
    const { chatId } = c.kind === KIND.GROUP ? await client.sendToGroup(c.to, text) : await client.sendToUser(c.to, text);
    m.pending = false;
    m.chatId = chatId;
    c.messages.splice(c.messages.indexOf(m), 1);
    insert(c, m);
    markRead(c);
    save();
  } catch (e) {
    m.pending = false;
    m.failed = e.message;
    $("send-error").textContent = `Message not sent: ${e.message}`;
    $("send-error").hidden = false;
  }
  if (current === conversationKey(c.kind, c.to)) renderPane();
  renderList();
}

function startConversation(event) {
  event.preventDefault();
  const kind = Number($("new-kind").value);
  const to = Number($("new-id").value);
  if (!Number.isInteger(to) || to < 1) return;
  const c = conversation(kind, to);
  $("new-id").value = "";
  save();
  open(conversationKey(kind, to));
  if (client) {
    client.track(kind, to, 0);
    client.sync(kind, to).catch((e) => showSendError(`Could not load ${title(c)}: ${e.message}`));
  }
}

function showSendError(text) {
  $("send-error").textContent = text;
  $("send-error").hidden = false;
}

async function signIn(mid, mkey, { quiet = false } = {}) {
  const button = $("login-button");
  button.disabled = true;
  $("login-error").hidden = true;
  me = mid;
  convs = loadConversations(mid);
  current = null;
  // Fetch some history again (to show it), and everything unread.
  const known = [...convs.values()].map((c) => ({
    kind: c.kind,
    to: c.to,
    last: Math.max(0, Math.min(c.read, c.last - HISTORY)),
  }));
  const next = new CometClient({ mid, mkey, conversations: known });
  next.addEventListener("state", (e) => renderState(e.detail));
  next.addEventListener("message", (e) => onMessage(e.detail));
  next.addEventListener("autherror", (e) => {
    if (client === next) signOut(`Signed out: ${e.detail.error.message}`);
  });
  client = next;
  try {
    await next.connect();
  } catch (e) {
    client = null;
    me = 0;
    button.disabled = false;
    sessionStorage.removeItem("comet.chat.session");
    showLogin(quiet && e.code !== "auth" ? "" : `Sign-in failed: ${e.message}`);
    return;
  }
  sessionStorage.setItem("comet.chat.session", JSON.stringify({ mid, mkey }));
  button.disabled = false;
  paintAvatar($("me-avatar"), String(mid).slice(-2), `u:${mid}`);
  $("me-name").textContent = `Member ${mid}`;
  $("login-view").hidden = true;
  $("chat-view").hidden = false;
  renderList();
  renderPane();
}

function showLogin(error) {
  $("chat-view").hidden = true;
  $("login-view").hidden = false;
  const el = $("login-error");
  el.textContent = error || "";
  el.hidden = !error;
}

function signOut(error) {
  const old = client;
  client = null;
  if (old) old.close();
  sessionStorage.removeItem("comet.chat.session");
  me = 0;
  convs = new Map();
  current = null;
  $("login-button").disabled = false;
  showLogin(error);
}

// ---- wiring --------------------------------------------------------------

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const mid = Number($("mid").value);
  if (!Number.isInteger(mid) || mid < 1) {
    showLogin("The member id is a positive whole number.");
    return;
  }
  signIn(mid, $("mkey").value);
});
$("logout").addEventListener("click", () => signOut(""));
$("new-form").addEventListener("submit", startConversation);
$("composer").addEventListener("submit", send);
$("composer-text").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
document.addEventListener("visibilitychange", () => {
  const c = current && convs.get(current);
  if (c && document.visibilityState === "visible") {
    markRead(c);
    renderList();
  }
});

try {
  const saved = JSON.parse(sessionStorage.getItem("comet.chat.session") || "null");
  if (saved && saved.mid > 0) signIn(saved.mid, saved.mkey, { quiet: true });
} catch {
  sessionStorage.removeItem("comet.chat.session");
}
