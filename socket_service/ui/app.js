// The chat page. It speaks only the public protocol (PROTOCOL.md and the
// README's "Protocol additions"): the HTTP API of the socket service,
// Socket.IO v4 events, and the upload function. Vendor libraries (io, marked,
// DOMPurify, highlight.js) come from pinned npm packages; Markdown rendering
// lives in markdown.js (window.ChatMarkdown).
//
// Map of this file, top to bottom: helpers; sign-in; connection and socket
// events; the conversation list (live, with unread counts); the open
// conversation (header, people, AI mode); messages (placing, rendering,
// streaming); sending (the outbox); stop and regenerate; typing; attachments;
// the profile dialog; wiring of the page's controls.
"use strict";

(function () {
  // The page's own elements, looked up once, at start-up (the script is
  // deferred: the page is parsed). Nothing rendered later, such as a reply's
  // Markdown, can take the place of one by carrying its id (issue 13, finding 1).
  const ELEMENTS = new Map(Array.from(document.querySelectorAll("[id]"), (node) => [node.id, node]));
  const $ = (id) => ELEMENTS.get(id);
  const Markdown = window.ChatMarkdown;
  const TOKEN_KEY = "chat.token";
  const CONV_KEY = "chat.conversation";
  const OUTBOX_KEY = "chat.outbox";
  const TYPING_SEND_MS = 2000;   // at most one typing=true per 2 s
  const TYPING_IDLE_MS = 3000;   // typing=false after 3 s without a key
  const TYPING_SHOW_MS = 5000;   // a remote "is typing" fades after 5 s
  const ACK_TIMEOUT_MS = 15000;
  const NO_ANSWER = "no answer from the server";
  // Codes worth sending again later with the same client_message_id (the server stores it once).
  const TRANSIENT = new Set(["unavailable", "rate_limited", "timeout"]);
  const AI_MODES = { always: "answers every message", mention: "answers only messages with @ai", off: "is off" };

  const state = {
    config: null,
    token: null,
    me: null,               // {id, name, handle}
    socket: null,
    conversations: new Map(),
    currentId: null,
    nextBefore: null,
    loadingOlder: false,
    historyLoaded: false,
    inRoom: false,          // false after a disconnect or left_room: the next send joins again
    msgs: new Map(),        // message_id -> message state
    local: new Map(),       // client_message_id -> message state (own messages)
    outbox: [],             // [{cmid, conversation_id, content}]: own messages not yet acknowledged
    flushing: false,
    flushRetry: null,
    typers: new Map(),      // user_id -> {name, timer}
    lastTypingSent: 0,
    typingIdle: null,
    convCursor: null,
    manualReconnect: null,
    manualAttempts: 0,
    attachments: [],        // [{file, type, row}]: picked, not sent yet
    readTimer: null,
    unseen: false,          // something arrived in the open conversation since it was last marked read
  };

  // ---------------------------------------------------------------- helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function uuid() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function decodeJwt(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const json = decodeURIComponent(Array.from(atob(part), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""));
      return JSON.parse(json);
    } catch (e) {
      return null;
    }
  }

  function formatSize(n) {
    if (n >= 1048576) return (n / 1048576).toFixed(1) + " MB";
    if (n >= 1024) return Math.round(n / 1024) + " KB";
    return n + " B";
  }

  // "just now", "5 min ago", "14:05", "Mon 14:05", "3 Mar": short enough for a message's head.
  function relativeTime(ts) {
    const then = new Date(ts);
    const seconds = (Date.now() - then.getTime()) / 1000;
    if (seconds < 45) return "just now";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    const time = then.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (new Date().toDateString() === then.toDateString()) return time;
    if (seconds < 6 * 86400) return then.toLocaleDateString([], { weekday: "short" }) + " " + time;
    return then.toLocaleDateString([], { day: "numeric", month: "short" });
  }

  function timeElement(ts) {
    return el("time", { class: "when", datetime: ts, title: new Date(ts).toLocaleString() }, relativeTime(ts));
  }

  function initials(name) {
    const words = String(name || "?").replace(/[^\p{L}\p{N} ]/gu, " ").trim().split(/\s+/);
    return ((words[0] || "?")[0] + (words.length > 1 ? words[words.length - 1][0] : "")).toUpperCase();
  }

  // Conversation-level information ("removed from the conversation"), at the top of the chat.
  function notice(text, isError) {
    const n = $("chat-notice");
    n.textContent = text || "";
    n.classList.toggle("error", !!isError);
  }

  // An action that failed says so next to the composer; the next success clears it.
  function showError(text) { $("composer-error").textContent = text; }
  function clearError() { $("composer-error").textContent = ""; }

  // Screen readers hear this once per event, not per streamed chunk.
  function announce(text) {
    const region = $("announce");
    region.textContent = "";
    region.textContent = text.length > 300 ? text.slice(0, 300) + "…" : text;
  }

  async function http(method, path, body) {
    const headers = {};
    if (state.token) headers.Authorization = "Bearer " + state.token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      const err = new Error((data && data.error && data.error.message) || ("HTTP " + r.status));
      err.status = r.status;
      err.code = data && data.error && data.error.code;
      err.reason = data && data.error && data.error.reason;
      throw err;
    }
    return data;
  }

  const convPath = (id, rest) => "/api/conversations/" + encodeURIComponent(id) + (rest || "");

  // ---------------------------------------------------------------- sign-in
  // Where a token may come from (issue 13, finding 6: a link could sign a
  // victim into an attacker's account, whose conversations then get what the
  // victim types and uploads):
  // - dev mode: the sign-in form, or #token=<JWT> in the address (tests and
  //   local tools open the page signed in this way);
  // - jwt mode, not in a frame: a token the user pastes into the sign-in form
  //   (their own act; a link cannot fill it in);
  // - any mode: postMessage({type: "chat-token", token}) from the parent
  //   window, if its origin is in TOKEN_PARENT_ORIGINS (named by the server in
  //   <meta name="chat-token-origins">; 'self' is this page's own origin).
  // In jwt mode a token in the address is dropped. A token for another user
  // than the one signed in replaces the session only if the user says so.
  const TOKEN_PARENT_ORIGINS = (document.querySelector('meta[name="chat-token-origins"]')?.content || "")
    .split(/\s+/).filter(Boolean).map((o) => (o === "'self'" ? location.origin : o));
  const IGNORED_LINK = "A sign-in link was ignored: sign in by pasting your own token, or from the application this chat is embedded in.";

  function takeFragmentToken() {
    // #token=... is read once and removed from the address bar and history.
    const hash = location.hash.startsWith("#") ? location.hash.slice(1) : "";
    const params = new URLSearchParams(hash);
    const token = params.get("token");
    if (token) {
      params.delete("token");
      const rest = params.toString();
      history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    }
    return token;
  }

  // The claims of a token that can be read and has not expired, else null.
  function liveClaims(token) {
    const claims = token ? decodeJwt(token) : null;
    return claims && claims.sub && (!claims.exp || claims.exp * 1000 > Date.now()) ? claims : null;
  }

  function userOf(claims) { return { id: claims.sub, name: claims.name || claims.sub, handle: null }; }
  function userLabel(user) { return user.name + " (" + user.id + ")"; }
  // The top bar: the name, and the handle others add you by (the id until one is chosen).
  function showMe() { $("me").textContent = state.me.name + " (" + (state.me.handle ? "@" + state.me.handle : state.me.id) + ")"; }

  function setToken(token) {
    const claims = decodeJwt(token);
    if (!claims || !claims.sub) {
      $("signin-error").textContent = "That token cannot be read.";
      return false;
    }
    state.token = token;
    const same = state.me && state.me.id === claims.sub;
    if (!same) state.me = userOf(claims);  // a refreshed token keeps the profile already read
    sessionStorage.setItem(TOKEN_KEY, token);
    return true;
  }

  // Resolves true once the user chooses to leave the current session for `next`.
  function askToSwitch(next) {
    const dialog = $("switch-user");
    if (dialog.open) return Promise.resolve(false);  // one question at a time: a second offer is declined
    $("switch-user-text").textContent = "This page was handed a sign-in for " + userLabel(next) + ", but you are signed in as "
      + userLabel(state.me) + ". Switch only if you asked for it: what you write would then go to that account.";
    $("switch-stay").textContent = "Stay signed in as " + userLabel(state.me);
    $("switch-go").textContent = "Switch to " + userLabel(next);
    dialog.returnValue = "";  // Escape closes with "": stay
    dialog.showModal();
    return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "switch"), { once: true }));
  }

  // Offers `token` to this tab. The signed-in user's own fresh token (a
  // refresh) is taken at once; another user's only if the user agrees, and
  // then the page reloads as that user, with nothing of the old session left.
  async function offerToken(token) {
    const claims = liveClaims(token);
    if (!claims) { $("signin-error").textContent = "That token cannot be read."; return; }
    if (state.me && claims.sub !== state.me.id) {
      if (!(await askToSwitch(userOf(claims)))) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      sessionStorage.removeItem(CONV_KEY);
      sessionStorage.removeItem(OUTBOX_KEY);
      location.reload();
      return;
    }
    const first = !state.token;
    setToken(token);
    if (first) start();
    else if (state.socket && !state.socket.connected) state.socket.connect();
  }

  function showSignIn(message) {
    $("app").hidden = true;
    $("signin").hidden = false;
    $("me").hidden = true;
    $("sign-out").hidden = true;
    const dev = state.config && state.config.auth_mode === "dev";
    const embedded = window.parent !== window;
    $("signin-form").hidden = !dev;
    $("signin-wait").hidden = dev || !embedded;
    $("signin-token-form").hidden = dev || embedded;
    $("signin-error").textContent = message || "";
    if (dev) $("signin-name").focus();
    else if (!embedded) $("signin-token").focus();
    setConn("idle", "Signed out");
  }

  async function devSignIn(name, knownUserId) {
    const userId = knownUserId || name.trim().toLowerCase().replace(/[^a-z0-9._-]+/g, "-").replace(/^-+|-+$/g, "") || "user";
    const r = await http("POST", "/api/dev/token", { user_id: userId, name: name.trim() });
    return r.token;
  }

  function signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(CONV_KEY);
    sessionStorage.removeItem(OUTBOX_KEY);
    state.token = null;
    state.me = null;
    state.outbox = [];
    if (state.socket) { state.socket.disconnect(); state.socket = null; }
    clearTimeout(state.manualReconnect);
    state.currentId = null;
    showSignIn();
  }

  async function start() {
    showMe();
    $("me").hidden = false;
    $("sign-out").hidden = false;
    $("signin").hidden = true;
    $("app").hidden = false;
    state.outbox = loadOutbox();
    connect();
    loadProfile();
    await loadConversations(true);
    const remembered = sessionStorage.getItem(CONV_KEY);
    if (remembered && state.conversations.has(remembered)) switchConversation(remembered, { focus: false });
    else showScreen("list");
  }

  async function loadProfile() {
    try {
      const me = await http("GET", "/api/me");
      Object.assign(state.me, { name: me.name || state.me.name, handle: me.handle || null });
      showMe();
    } catch (e) { /* the token's name stays shown */ }
  }

  // ------------------------------------------------------------- connection
  // data-state is "connected", "connecting", "reconnecting" or "idle"; when
  // the browser knows it has no network the text says "Offline" (not a
  // server problem), and messages wait in the outbox.
  function setConn(kind, text) {
    const c = $("conn-state");
    const offline = kind !== "idle" && kind !== "connected" && navigator.onLine === false;
    c.dataset.state = kind;
    c.dataset.offline = offline ? "1" : "0";
    c.textContent = offline ? "Offline: messages will be sent when the network is back" : text;
  }

  function connect() {
    if (state.socket) state.socket.disconnect();
    const socket = io({
      transports: ["websocket"],          // no sticky sessions needed
      auth: (cb) => cb({ token: state.token }),  // read at every (re)connect: a fresh token is used
      reconnection: true,
      reconnectionDelay: 500,
      reconnectionDelayMax: 10000,
      randomizationFactor: 0.5,
    });
    state.socket = socket;
    setConn("connecting", "Connecting…");

    socket.on("connect", async () => {
      state.manualAttempts = 0;
      setConn("connected", "Connected");
      if (state.currentId) await joinCurrent();
      flushOutbox();
    });
    socket.on("disconnect", (reason) => {
      state.inRoom = false;
      setConn("reconnecting", "Reconnecting…");
      if (reason === "io server disconnect") scheduleManualReconnect();  // the client library does not retry these
    });
    socket.io.on("reconnect_attempt", (n) => setConn("reconnecting", "Reconnecting… (attempt " + n + ")"));
    socket.on("connect_error", async (err) => {
      if (err && err.data && err.data.code === "unauthenticated") {
        if (await refreshToken()) { scheduleManualReconnect(); return; }
        socket.disconnect();
        showSignIn("Your session has ended; please sign in again.");
        return;
      }
      setConn("reconnecting", "Cannot reach the server; retrying…");
      if (!socket.active) scheduleManualReconnect();
    });
    socket.on("error", async (e) => {
      if (e && e.code === "unauthenticated") { await refreshToken(); return; }
      if (e && e.event === "upload") { uploadRefusedByServer(e); return; }
      if (e && e.event) return;  // already shown through the ack of that event
      showError((e && e.message) || "error");
    });
    socket.on("new_message", (m) => { if (m.conversation_id === state.currentId) onUserMessage(m); });
    socket.on("file_uploaded", (m) => {
      if (state.me && m.user_id === state.me.id) uploadArrived(m);
      if (m.conversation_id === state.currentId) onUserMessage(m);
    });
    socket.on("ai_thinking", (m) => {
      if (m.conversation_id !== state.currentId) return;
      const msg = ensureAssistant(m.message_id);
      msg.replyTo = m.reply_to || msg.replyTo;
      if (!isDone(msg)) { msg.status = msg.status === "streaming" ? "streaming" : "pending"; renderMessage(msg); }
      updateStop();
    });
    socket.on("ai_response_chunk", (c) => { if (c.conversation_id === state.currentId) onChunk(c); });
    socket.on("ai_response_complete", (m) => { if (m.conversation_id === state.currentId) onReplyComplete(m); });
    socket.on("ai_response_error", (m) => {
      if (m.conversation_id !== state.currentId) return;
      const msg = ensureAssistant(m.message_id);
      msg.status = "error";
      msg.error = m.error;
      renderMessage(msg);
      updateStop();
      announce("The reply failed: " + ((m.error && m.error.message) || "error"));
    });
    socket.on("user_typing", onUserTyping);
    socket.on("conversation_updated", onConversationUpdated);
    socket.on("left_room", (m) => {
      if (m.conversation_id !== state.currentId) return;
      state.inRoom = false;
      notice(m.message || "You left this conversation.", true);
    });
  }

  function scheduleManualReconnect() {
    clearTimeout(state.manualReconnect);
    const n = state.manualAttempts++;
    const delay = Math.min(10000, 500 * 2 ** n) * (0.5 + Math.random());
    setConn("reconnecting", "Reconnecting…");
    state.manualReconnect = setTimeout(() => { if (state.socket && !state.socket.connected) state.socket.connect(); }, delay);
  }

  async function refreshToken() {
    // Dev mode: ask the dev endpoint again for the same user. Otherwise the
    // embedding application is asked for a fresh token.
    if (state.config.auth_mode === "dev" && state.me) {
      try {
        const token = await devSignIn(state.me.name, state.me.id);
        if (decodeJwt(token).sub === state.me.id) { setToken(token); return true; }
      } catch (e) { /* fall through */ }
      return false;
    }
    if (window.parent !== window) window.parent.postMessage({ type: "chat-token-request" }, "*");
    return false;
  }

  // Resolves with the ack, or {ok: false, error} when not connected or unanswered:
  // never rejects, so callers read one shape.
  function emitAck(event, payload) {
    return new Promise((resolve) => {
      if (!state.socket || !state.socket.connected) {
        resolve({ ok: false, error: { code: "unavailable", message: navigator.onLine === false ? "offline" : "not connected" } });
        return;
      }
      state.socket.timeout(ACK_TIMEOUT_MS).emit(event, payload, (err, ack) => {
        if (err) resolve({ ok: false, error: { code: "timeout", message: NO_ANSWER } });
        else resolve(ack || { ok: false, error: { code: "internal", message: "empty answer" } });
      });
    });
  }

  // ----------------------------------------------------------- conversations
  // state.conversations holds the conversation objects of the API, merged
  // with what conversation_updated tells (last_message, unread_count), and is
  // shown most recent activity first.
  async function loadConversations(reset) {
    if (reset) state.convCursor = null;
    try {
      const page = await http("GET", "/api/conversations?limit=50" + (state.convCursor ? "&cursor=" + encodeURIComponent(state.convCursor) : ""));
      if (reset) {
        // A page requested before a conversation was created here may not have it yet: keep the open one.
        const open = state.conversations.get(state.currentId);
        const previous = state.conversations;
        state.conversations = new Map();
        if (open && !page.items.some((c) => c.id === open.id)) state.conversations.set(open.id, open);
        for (const c of page.items) mergeConversation(Object.assign({}, previous.get(c.id), c));
      } else {
        for (const c of page.items) mergeConversation(c);
      }
      state.convCursor = page.next_cursor;
      $("more-convs").hidden = !page.next_cursor;
      renderConversations();
    } catch (e) {
      if (e.status === 401) { signOut(); showSignIn("Your session has ended; please sign in again."); return; }
      showError("Could not load conversations: " + e.message);
    }
  }

  function mergeConversation(c) {
    const merged = Object.assign(state.conversations.get(c.id) || {}, c);
    state.conversations.set(c.id, merged);
    return merged;
  }

  function activityOf(c) { return (c.last_message && c.last_message.timestamp) || c.updated_at || c.created_at || ""; }

  function previewOf(c) {
    const m = c.last_message;
    if (!m) return "";
    const who = m.role === "assistant" ? "Assistant" : (state.me && m.user_id === state.me.id ? "You" : (m.username || m.user_id));
    return who + ": " + (m.preview || "(a file)");
  }

  function renderConversations() {
    const list = $("conversations");
    const sorted = Array.from(state.conversations.values()).sort((a, b) => (activityOf(a) < activityOf(b) ? 1 : -1));
    list.replaceChildren(...sorted.map((c) => {
      const unread = c.id === state.currentId && !c.unread_count ? 0 : c.unread_count || 0;
      const badge = unread ? el("span", { class: "unread", "aria-label": unreadText(unread) }, unread >= 99 ? "99+" : String(unread)) : null;
      const preview = previewOf(c);
      const b = el("button", { type: "button", class: "conv", "data-id": c.id, "aria-current": c.id === state.currentId ? "true" : null,
        onclick: () => switchConversation(c.id) },
      el("span", { class: "conv-line" }, el("span", { class: "conv-title" }, c.title || "(untitled)"), badge),
      preview ? el("span", { class: "conv-preview" }, preview) : null);
      return el("li", {}, b);
    }));
    $("conv-empty").hidden = state.conversations.size > 0;
    updateTitle();
  }

  function unreadText(n) { return (n >= 99 ? "99 or more" : String(n)) + " unread"; }

  // "(3) Chat": the unread messages of every conversation in the list.
  function updateTitle() {
    let total = 0;
    for (const c of state.conversations.values()) total += c.unread_count || 0;
    document.title = total ? "(" + (total > 99 ? "99+" : total) + ") Chat" : "Chat";
  }

  function onConversationUpdated(u) {
    const id = u.conversation_id;
    if (u.reason === "removed" || u.reason === "deleted") { dropConversation(id, u.reason); return; }
    const known = state.conversations.get(id);
    if (!known && !u.conversation) { refreshConversation(id); return; }
    // Updates come from several publishers (each socket-service instance, the functions) in no
    // order between them, and a message update carries the conversation as its publisher read it,
    // maybe before a newer change of title, people or AI mode. For a conversation the page knows,
    // such a snapshot only adds activity; the changes themselves come with their own reasons.
    const activityOnly = !!known && u.reason === "message";
    const c = activityOnly ? known : mergeConversation(Object.assign({}, u.conversation || {}, { id }));
    if (activityOnly && u.conversation && u.conversation.updated_at > (c.updated_at || "")) c.updated_at = u.conversation.updated_at;
    if (u.last_message && !(c.last_message && c.last_message.timestamp > u.last_message.timestamp)) c.last_message = u.last_message;
    if (typeof u.unread_count === "number") c.unread_count = u.unread_count;
    if (u.reason === "message" && u.last_message && !(state.me && u.last_message.user_id === state.me.id)) {
      if (id === state.currentId) { state.unseen = true; scheduleMarkRead(); }
      if (id !== state.currentId || !readingAtBottom()) refreshConversation(id);  // the exact unread count
    }
    renderConversations();
    if (id === state.currentId) renderChatHead();
  }

  // The conversation object with its unread_count, from the server. For a conversation the page
  // knows, only the count is taken: the answer may have been read before an update that came meanwhile.
  async function refreshConversation(id) {
    try {
      const c = await http("GET", convPath(id));
      const known = state.conversations.get(id);
      if (known) known.unread_count = c.unread_count;
      else mergeConversation(c);
      renderConversations();
      if (id === state.currentId) renderChatHead();
    } catch (e) { /* not ours (any more): the next list load settles it */ }
  }

  // Removed from a conversation, or it was deleted: it leaves the list. An
  // open one stays on screen, with the reason, until another is opened.
  function dropConversation(id, reason) {
    const c = state.conversations.get(id);
    state.conversations.delete(id);
    renderConversations();
    if (id !== state.currentId) return;
    const title = c && c.title ? "“" + c.title + "”" : "this conversation";
    if (reason === "deleted") {
      closeConversation();
      notice("The conversation " + title + " was deleted.", true);
    } else {
      state.inRoom = false;
      if (!$("chat-notice").textContent) notice("You were removed from " + title + ".", true);  // left_room may have said it
      renderChatHead();
    }
  }

  function readingAtBottom() {
    const box = $("messages");
    return document.visibilityState === "visible" && box.scrollHeight - box.scrollTop - box.clientHeight < 60;
  }

  // The open conversation counts as read when its end is on screen.
  function scheduleMarkRead() {
    clearTimeout(state.readTimer);
    state.readTimer = setTimeout(markRead, 300);
  }

  async function markRead() {
    const id = state.currentId;
    const c = state.conversations.get(id);
    if (!c || !readingAtBottom() || !(state.unseen || c.unread_count)) return;
    state.unseen = false;
    try {
      const r = await http("PUT", convPath(id, "/read"), {});
      c.unread_count = r.unread_count;
      renderConversations();
    } catch (e) { state.unseen = true; }
  }

  // ------------------------------------------------------ open conversation
  const isOwner = (c) => !!(c && state.me && c.owner_id === state.me.id);

  function nameOf(c, userId) {
    const info = c && c.participants_info && c.participants_info.find((p) => p.user_id === userId);
    return (info && info.name) || userId;
  }

  function renderChatHead() {
    const c = state.conversations.get(state.currentId);
    const open = !!state.currentId;
    $("chat-title").textContent = c ? (c.title || "(untitled)") : (open ? $("chat-title").textContent : "No conversation selected");
    $("composer-form").hidden = !open;
    $("chat-tools").hidden = !c;
    if (!c) { $("participants").replaceChildren(); return; }
    renderParticipants(c);
    const owner = isOwner(c);
    $("add-people").hidden = !owner;
    $("rename-conv").hidden = !owner;
    $("delete-conv").hidden = !owner;
    if (!owner) $("add-participant-form").hidden = true;
    const mode = c.ai_mode || "always";
    $("ai-mode").value = mode;
    $("ai-mode").disabled = !owner;
    $("ai-mode").title = owner ? "" : "Only the owner of the conversation can change this";
    $("ai-mode-note").textContent = "The assistant " + AI_MODES[mode] + ".";
    $("composer").placeholder = mode === "mention" ? "Message (write @ai to ask the assistant)" :
      "Message (Enter to send, Shift+Enter for a new line)";
  }

  function renderParticipants(c) {
    const owner = isOwner(c);
    const people = (c.participants_info || c.participants.map((u) => ({ user_id: u, name: u }))).map((p) => {
      const self = state.me && p.user_id === state.me.id;
      const item = el("li", { class: "person", "data-user-id": p.user_id },
        el("span", { class: "avatar", "aria-hidden": "true" }, initials(p.name)),
        el("span", { class: "person-name", title: p.user_id }, self ? p.name + " (you)" : p.name),
        p.user_id === c.owner_id ? el("span", { class: "role-note" }, "owner") : null);
      if (owner && !self) {
        item.append(el("button", { type: "button", class: "remove-person", "aria-label": "Remove " + p.name,
          title: "Remove " + p.name, onclick: () => removeParticipant(c, p) }, "Remove"));
      } else if (self && !owner) {
        item.append(el("button", { type: "button", class: "leave", onclick: () => removeParticipant(c, p) }, "Leave"));
      }
      return item;
    });
    $("participants").replaceChildren(...people);
  }

  async function removeParticipant(c, person) {
    const self = state.me && person.user_id === state.me.id;
    try {
      const r = await http("DELETE", convPath(c.id, "/participants/" + encodeURIComponent(person.user_id)));
      clearError();
      if (self) { dropConversation(c.id, "removed"); notice("You left “" + (c.title || "(untitled)") + "”."); return; }
      c.participants = r.participants;
      c.participants_info = (c.participants_info || []).filter((p) => r.participants.includes(p.user_id));
      renderChatHead();
      notice("Removed " + person.name + ".");
    } catch (e) {
      showError("Could not remove " + person.name + ": " + e.message);
    }
  }

  // Adding someone: look the handle or id up first, show who it is, add on confirmation.
  let found = null;
  async function findParticipant(query) {
    found = null;
    $("participant-found").hidden = true;
    $("participant-error").textContent = "";
    try {
      const user = await http("GET", "/api/users/lookup?q=" + encodeURIComponent(query));
      found = user;
      $("participant-found-name").textContent = user.name + (user.handle ? " (@" + user.handle + ")" : " (" + user.user_id + ")");
      $("participant-confirm").textContent = "Add " + user.name;
      $("participant-found").hidden = false;
      $("participant-confirm").focus();
    } catch (e) {
      $("participant-error").textContent = e.status === 404
        ? "No one has the handle or user id “" + query + "”. Check the spelling: it must match exactly."
        : "Could not look up “" + query + "”: " + e.message;
    }
  }

  async function addFoundParticipant() {
    if (!found) return;
    const user = found;
    try {
      const r = await http("POST", convPath(state.currentId, "/participants"), { user_id: user.user_id });
      const c = state.conversations.get(state.currentId);
      if (c) {
        c.participants = r.participants;
        const known = (c.participants_info || []).filter((p) => p.user_id !== user.user_id);
        c.participants_info = known.concat([{ user_id: user.user_id, name: user.name }]);
      }
      hideAddForm();
      renderChatHead();
      notice("Added " + user.name + ".");
    } catch (e) {
      $("participant-error").textContent = "Could not add " + user.name + ": " + e.message;
    }
  }

  function hideAddForm() {
    found = null;
    $("participant-query").value = "";
    $("participant-found").hidden = true;
    $("participant-error").textContent = "";
    $("add-participant-form").hidden = true;
    $("add-people").setAttribute("aria-expanded", "false");
  }

  async function setAiMode(mode) {
    const c = state.conversations.get(state.currentId);
    if (!c) return;
    try {
      mergeConversation(await http("PATCH", convPath(c.id), { ai_mode: mode }));
      clearError();
    } catch (e) {
      showError("Could not change the AI mode: " + e.message);
    }
    renderChatHead();
  }

  // On a phone the list and the chat are two screens (app.css); on a wide screen both show.
  function showScreen(screen) { $("app").dataset.screen = screen; }

  function clearChat() {
    state.msgs.clear();
    state.local.clear();
    state.nextBefore = null;
    state.historyLoaded = false;
    state.inRoom = false;
    state.unseen = false;
    for (const t of state.typers.values()) clearTimeout(t.timer);
    state.typers.clear();
    renderTyping();
    $("message-list").replaceChildren();
    delete $("message-list").dataset.loaded;
    $("load-older").hidden = true;
    $("empty-conv").hidden = true;
    notice("");
    clearError();
    hideAddForm();
  }

  function closeConversation() {
    state.currentId = null;
    sessionStorage.removeItem(CONV_KEY);
    clearChat();
    renderConversations();
    renderChatHead();
    updateStop();
    showScreen("list");
  }

  // Opens conversation `id`. `focus`: move the keyboard focus to the composer
  // (not on touch screens, where that would pop the keyboard up over the messages).
  async function switchConversation(id, { focus = true } = {}) {
    if (state.currentId && state.currentId !== id && state.socket && state.socket.connected) {
      state.socket.emit("leave_room", { conversation_id: state.currentId }, () => {});
    }
    const same = state.currentId === id;
    state.currentId = id;
    sessionStorage.setItem(CONV_KEY, id);
    showScreen("chat");
    const moveFocus = () => { if (focus && !touchScreen()) $("composer").focus(); };
    if (same && state.historyLoaded) { moveFocus(); return; }
    clearChat();
    renderConversations();
    renderChatHead();
    moveFocus();
    showQueued();
    updateStop();
    updateCounter();
    if (state.socket && state.socket.connected) await joinCurrent();
  }

  // Join first, then read the history: the join snapshot plus live chunks
  // cover every reply in progress, and the history read afterwards cannot
  // miss a reply that ended in between.
  async function joinCurrent() {
    const id = state.currentId;
    const ack = await emitAck("join_room", { conversation_id: id });
    if (id !== state.currentId) return;
    if (!ack.ok) { notice("Cannot open this conversation: " + ack.error.message, true); return; }
    state.inRoom = true;
    notice("");
    for (const s of ack.streaming || []) applySnapshot(s);
    const mode = state.historyLoaded ? "refresh" : "first";
    state.historyLoaded = true;
    await loadHistory(mode);
    updateStop();
    scheduleMarkRead();
  }

  async function loadHistory(mode) {
    const id = state.currentId;
    const before = mode === "older" ? state.nextBefore : null;
    if (mode === "older" && !before) return;
    const list = $("message-list");
    const box = $("messages");
    const fromBottom = box.scrollHeight - box.scrollTop;
    let page;
    try {
      page = await http("GET", convPath(id, "/messages?limit=50" + (before ? "&before=" + encodeURIComponent(before) : "")));
    } catch (e) {
      notice("Could not load messages: " + e.message, true);
      return;
    }
    if (id !== state.currentId) return;
    for (const item of page.items) upsertFromHistory(item);
    if (mode !== "refresh") {
      state.nextBefore = page.next_before;
      $("load-older").hidden = !page.next_before;
    }
    if (mode === "older") box.scrollTop = box.scrollHeight - fromBottom;  // keep what the reader was looking at
    else if (mode === "first") box.scrollTop = box.scrollHeight;
    list.dataset.loaded = "1";
    updateEmpty();
  }

  // An empty conversation says what to do; so does an empty list (renderConversations).
  function updateEmpty() {
    $("empty-conv").hidden = !($("message-list").dataset.loaded && $("message-list").children.length === 0);
  }

  async function loadOlder() {
    if (state.loadingOlder || !state.nextBefore || !state.currentId) return;
    state.loadingOlder = true;
    try { await loadHistory("older"); } finally { state.loadingOlder = false; }
  }

  // --------------------------------------------------------------- messages
  // A message's state: {id, cmid (own messages), role, content, status,
  // user_id, username, files, timestamp, replyTo, stoppedBy, error, el} plus,
  // for a reply being streamed, the snapshot (base, baseSeq) and the chunks
  // after it. Statuses: user messages "queued" (in the outbox), "sending",
  // "complete" (shown as "sent"), "failed"; replies "pending", "streaming",
  // "complete", "cancelled", "error".
  function isDone(m) { return m.status === "complete" || m.status === "cancelled" || m.status === "error"; }

  function newMessage(fields) {
    const m = Object.assign({ id: null, cmid: null, role: "user", content: "", status: "complete", user_id: null, username: null,
      files: null, timestamp: null, replyTo: null, stoppedBy: null, base: "", baseSeq: 0, chunks: new Map(), error: null, el: null }, fields);
    m.el = el("li", { class: "msg" });
    renderMessage(m);
    return m;
  }

  // Places a message by timestamp; those without one (just sent, or a reply
  // known only from the join snapshot) go last.
  function place(m) {
    const list = $("message-list");
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
    let anchor = null;
    if (m.timestamp) {
      for (const child of list.children) {
        const ts = child.dataset.ts;
        if (!ts || ts > m.timestamp) { anchor = child; break; }
      }
    }
    list.insertBefore(m.el, anchor);
    if (atBottom) box.scrollTop = box.scrollHeight;
    updateEmpty();
  }

  function upsertFromHistory(item) {
    let m = state.msgs.get(item.message_id);
    if (!m && item.client_message_id) m = state.local.get(item.client_message_id);
    if (m) {
      m.timestamp = m.timestamp || item.timestamp;
      if (item.role === "assistant") {
        // Live chunks and the join snapshot are newer than a checkpoint; a
        // finished status from the history is not (a completion we missed).
        if (isDone(item) && !isDone(m)) { m.content = item.content; m.status = item.status; }
        m.stoppedBy = item.stopped_by || m.stoppedBy;
        m.replyTo = item.reply_to || m.replyTo;
      } else {
        m.content = item.content; m.files = item.files || m.files; m.status = "complete";
        forgetQueued(m.cmid);
      }
      if (!m.id) { m.id = item.message_id; state.msgs.set(m.id, m); }
      renderMessage(m);
      return;
    }
    m = newMessage({ id: item.message_id, role: item.role, content: item.content, status: item.status || "complete",
      user_id: item.user_id || null, username: item.username || null, files: item.files || null, timestamp: item.timestamp,
      cmid: item.client_message_id || null, replyTo: item.reply_to || null, stoppedBy: item.stopped_by || null });
    state.msgs.set(m.id, m);
    place(m);
  }

  function onUserMessage(wire) {
    let m = state.msgs.get(wire.message_id);
    if (!m && wire.client_message_id) m = state.local.get(wire.client_message_id);
    if (m) {
      m.id = wire.message_id;
      m.content = wire.content;
      m.files = wire.files || m.files;
      m.timestamp = wire.timestamp;
      m.status = "complete";
      m.error = null;
      state.msgs.set(m.id, m);
      forgetQueued(m.cmid);
      renderMessage(m);
      return;
    }
    m = newMessage({ id: wire.message_id, role: "user", content: wire.content, user_id: wire.user_id, username: wire.username || null,
      files: wire.files || null, timestamp: wire.timestamp, cmid: wire.client_message_id || null });
    state.msgs.set(m.id, m);
    place(m);
    if (!(state.me && wire.user_id === state.me.id)) {
      announce(authorLabel(m) + ": " + (wire.content || "sent a file"));
      state.unseen = true;
      scheduleMarkRead();
    }
  }

  function ensureAssistant(id) {
    let m = state.msgs.get(id);
    if (!m) {
      m = newMessage({ id, role: "assistant", status: "pending" });
      state.msgs.set(id, m);
      place(m);
    }
    return m;
  }

  function onReplyComplete(wire) {
    const m = ensureAssistant(wire.message_id);
    m.content = wire.content;
    m.status = wire.status;
    m.timestamp = wire.timestamp;
    m.stoppedBy = wire.stopped_by || m.stoppedBy;
    renderMessage(m);
    updateStop();
    // The one announcement of a streamed reply: when it is whole.
    announce(m.status === "cancelled" ? stoppedText(m) : authorLabel(m) + ": " + m.content);
    state.unseen = true;
    scheduleMarkRead();
  }

  function streamedText(m) {
    let text = m.base;
    let seq = m.baseSeq;
    while (m.chunks.has(seq + 1)) { seq += 1; text += m.chunks.get(seq); }
    return text;
  }

  function applySnapshot(s) {
    const m = ensureAssistant(s.message_id);
    if (isDone(m)) return;
    if (s.seq >= m.baseSeq) {
      m.base = s.content;
      m.baseSeq = s.seq;
      for (const k of m.chunks.keys()) if (k <= s.seq) m.chunks.delete(k);
    }
    m.content = streamedText(m);
    m.status = s.seq > 0 ? "streaming" : "pending";
    renderMessage(m);
  }

  function onChunk(c) {
    const m = ensureAssistant(c.message_id);
    if (isDone(m) || c.seq <= m.baseSeq) return;  // already in the snapshot
    m.chunks.set(c.seq, c.chunk);
    m.content = streamedText(m);
    m.status = "streaming";
    scheduleRender(m);
    updateStop();
  }

  const dirty = new Set();
  let frame = null;
  function scheduleRender(m) {
    dirty.add(m);
    if (frame === null) frame = requestAnimationFrame(() => {
      frame = null;
      for (const d of dirty) renderMessage(d);
      dirty.clear();
    });
  }

  function assistantName() {
    return state.config && state.config.ai_provider === "offline" ? "Offline stand-in (not an AI model)" : "Assistant";
  }

  function authorLabel(m) {
    if (m.role === "assistant") return assistantName();
    if (!m.user_id || (state.me && m.user_id === state.me.id)) return "You";
    return m.username || nameOf(state.conversations.get(state.currentId), m.user_id);
  }

  function stoppedText(m) {
    return m.stoppedBy ? "Stopped by " + (state.me && m.stoppedBy.user_id === state.me.id ? "you" : m.stoppedBy.name) + "."
      : "Stopped before the end.";
  }

  function renderFiles(files) {
    const box = el("div", { class: "files" });
    for (const f of files) {
      const url = f.url ? Markdown.safeUrl(f.url) : null;
      const label = f.filename + " (" + formatSize(f.size || 0) + ")";
      if (url && /^image\/(png|jpeg|gif|webp)$/.test(f.content_type)) {
        box.append(el("a", { href: url, target: "_blank", rel: "noopener noreferrer", class: "file image" },
          el("img", { src: url, alt: f.filename, class: "thumb", loading: "lazy" })));
      } else if (url) {
        box.append(el("a", { href: url, target: "_blank", rel: "noopener noreferrer", class: "file" }, label));
      } else {
        box.append(el("span", { class: "file" }, label + " (link unavailable)"));
      }
    }
    return box;
  }

  const REPLY_STATES = { pending: "thinking…", streaming: "writing…", cancelled: "stopped", error: "failed" };
  const OWN_STATES = { queued: "queued", sending: "sending…", complete: "sent", failed: "failed" };

  function messageHead(m, mine) {
    const author = authorLabel(m);
    const avatar = m.role === "assistant"
      ? el("span", { class: "avatar bot", "aria-hidden": "true", title: "Assistant" }, "AI")
      : el("span", { class: "avatar", "aria-hidden": "true" }, initials(mine && state.me ? state.me.name : author));
    const head = el("div", { class: "msg-head" }, avatar, el("span", { class: "author" }, author));
    if (m.timestamp) head.append(timeElement(m.timestamp));
    const label = m.role === "assistant" ? REPLY_STATES[m.status] : (mine ? OWN_STATES[m.status] : null);
    if (label) head.append(el("span", { class: "state" }, label));
    return head;
  }

  // Actions under a message: buttons, so the keyboard reaches them with Tab.
  function messageActions(m) {
    const actions = [];
    if (m.role === "assistant" && isDone(m) && regenerateSource(m)) {
      actions.push(el("button", { type: "button", class: "regenerate", onclick: () => regenerate(m),
        "aria-label": "Regenerate this reply" }, "Regenerate"));
    }
    return actions.length ? el("div", { class: "msg-actions" }, ...actions) : null;
  }

  function renderMessage(m) {
    const box = $("messages");
    const follow = m.el.isConnected && box.scrollHeight - box.scrollTop - box.clientHeight < 60;
    const mine = m.role === "user" && (!m.user_id || (state.me && m.user_id === state.me.id));
    m.el.className = "msg " + m.role + (mine ? " mine" : "") + " status-" + m.status;
    if (m.id) m.el.dataset.id = m.id;
    if (m.cmid) m.el.dataset.cmid = m.cmid;
    if (m.timestamp) m.el.dataset.ts = m.timestamp;
    m.el.dataset.status = m.status;
    m.el.dataset.role = m.role;
    const body = el("div", { class: "content" });
    Markdown.render(body, m.content, { asPerson: m.role === "user", finished: m.role === "user" || isDone(m) });
    const parts = [messageHead(m, mine), body];
    if (m.files && m.files.length) parts.push(renderFiles(m.files));
    if (m.role === "assistant" && m.status === "cancelled") parts.push(el("p", { class: "stopped-note" }, stoppedText(m)));
    if (m.error) {
      const err = el("p", { class: "msg-error", role: "alert" }, (m.error.message || m.error.code || "failed") + " ");
      err.append(el("button", { type: "button", class: "retry", onclick: () => retry(m) }, "Retry"));
      parts.push(err);
    }
    parts.push(messageActions(m));
    m.el.replaceChildren(...parts.filter(Boolean));
    if (follow) box.scrollTop = box.scrollHeight;  // a reader at the bottom follows a growing reply
  }

  // Relative times age: refresh them twice a minute.
  function refreshTimes() {
    for (const t of $("message-list").querySelectorAll("time.when")) t.textContent = relativeTime(t.getAttribute("datetime"));
  }

  // ---------------------------------------------------- sending: the outbox
  // Every message goes through the outbox (kept in this tab's sessionStorage,
  // so a reload does not lose it): shown "queued" at once, sent when
  // connected, and sent again after a disconnect or a server without answer
  // with the same client_message_id, which the server stores once. It leaves
  // the outbox when acknowledged, or when refused for good ("failed", with Retry).
  function loadOutbox() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(OUTBOX_KEY) || "[]");
      return Array.isArray(saved) ? saved.filter((q) => q && q.cmid && q.conversation_id && typeof q.content === "string") : [];
    } catch (e) {
      return [];
    }
  }

  function saveOutbox() { sessionStorage.setItem(OUTBOX_KEY, JSON.stringify(state.outbox)); }

  function forgetQueued(cmid) {
    const before = state.outbox.length;
    state.outbox = state.outbox.filter((q) => q.cmid !== cmid);
    if (state.outbox.length !== before) saveOutbox();
  }

  // The open conversation's queued messages (after a reload, or back to it).
  function showQueued() {
    for (const q of state.outbox) {
      if (q.conversation_id !== state.currentId || state.local.has(q.cmid)) continue;
      const m = newMessage({ role: "user", content: q.content, user_id: state.me.id, status: "queued", cmid: q.cmid });
      state.local.set(m.cmid, m);
      place(m);
    }
  }

  function send(text) {
    const m = newMessage({ role: "user", content: text, user_id: state.me.id, status: "queued", cmid: uuid() });
    state.local.set(m.cmid, m);
    place(m);
    $("messages").scrollTop = $("messages").scrollHeight;
    state.outbox.push({ cmid: m.cmid, conversation_id: state.currentId, content: text });
    saveOutbox();
    flushOutbox();
  }

  function retry(m) {
    if (m.role === "assistant") { regenerate(m); return; }  // a failed reply: ask for it again
    m.error = null;
    m.status = "queued";
    renderMessage(m);
    if (!state.outbox.some((q) => q.cmid === m.cmid)) {
      state.outbox.push({ cmid: m.cmid, conversation_id: state.currentId, content: m.content });
      saveOutbox();
    }
    flushOutbox();
  }

  // Sends the outbox in order, one at a time. Stops at a transient failure
  // and tries again later (or at the next connect).
  async function flushOutbox() {
    if (state.flushing || !state.socket || !state.socket.connected) return;
    state.flushing = true;
    clearTimeout(state.flushRetry);
    try {
      while (state.outbox.length && state.socket.connected) {
        const q = state.outbox[0];
        const m = state.local.get(q.cmid);
        if (m) { m.status = "sending"; renderMessage(m); }
        if (q.conversation_id === state.currentId && !state.inRoom) await joinCurrent();  // e.g. removed, then added back
        const ack = await emitAck("send_message", { conversation_id: q.conversation_id, message: q.content, client_message_id: q.cmid });
        if (!ack.ok && TRANSIENT.has(ack.error.code)) {
          if (m && m.status === "sending") { m.status = "queued"; renderMessage(m); }
          const wait = ack.error.retry_after ? ack.error.retry_after * 1000 : 3000;
          state.flushRetry = setTimeout(flushOutbox, wait);
          break;
        }
        forgetQueued(q.cmid);
        if (ack.ok) clearError();
        if (!m) continue;  // sent from another conversation's view: its history shows it
        if (ack.ok) {
          if (!m.id) { m.id = ack.message_id; state.msgs.set(m.id, m); }
          if (m.status === "sending") m.status = "complete";
          m.error = null;
        } else {
          m.status = "failed";
          m.error = ack.error;
        }
        renderMessage(m);
      }
    } finally {
      state.flushing = false;
    }
  }

  // ---------------------------------------------------- stop and regenerate
  function generating() {
    for (const m of state.msgs.values()) if (m.role === "assistant" && !isDone(m)) return true;
    return false;
  }

  function updateStop() { $("stop").hidden = !generating(); }

  async function stopReply() {
    const ack = await emitAck("stop_generation", { conversation_id: state.currentId });
    if (!ack.ok && ack.error.code !== "not_found") showError("Could not stop: " + ack.error.message);
  }

  // The user message a reply answers: reply_to (from the history, or from
  // ai_thinking when the page saw the reply start), else the closest user
  // message above it (servers that do not send reply_to).
  function regenerateSource(m) {
    if (m.replyTo) return m.replyTo;
    let prev = m.el.previousElementSibling;
    while (prev && prev.dataset.role !== "user") prev = prev.previousElementSibling;
    return prev && prev.dataset.id ? prev.dataset.id : null;
  }

  async function regenerate(m) {
    const source = regenerateSource(m);
    if (!source) return;
    const ack = await emitAck("regenerate", { conversation_id: state.currentId, message_id: source, client_request_id: uuid() });
    if (!ack.ok) { showError("Could not regenerate the reply: " + ack.error.message); return; }
    clearError();
    const reply = ensureAssistant(ack.message_id);
    reply.replyTo = source;
    renderMessage(reply);
    updateStop();
  }

  // ----------------------------------------------------------------- typing
  function typingInput() {
    if (!state.currentId || !state.socket || !state.socket.connected) return;
    const now = Date.now();
    if (now - state.lastTypingSent > TYPING_SEND_MS) {
      state.lastTypingSent = now;
      state.socket.emit("typing", { conversation_id: state.currentId, is_typing: true }, () => {});
    }
    clearTimeout(state.typingIdle);
    state.typingIdle = setTimeout(stopTyping, TYPING_IDLE_MS);
  }

  function stopTyping() {
    clearTimeout(state.typingIdle);
    if (state.lastTypingSent && state.socket && state.socket.connected && state.currentId) {
      state.socket.emit("typing", { conversation_id: state.currentId, is_typing: false }, () => {});
    }
    state.lastTypingSent = 0;
  }

  function onUserTyping(t) {
    if (t.conversation_id !== state.currentId || (state.me && t.user_id === state.me.id)) return;
    const old = state.typers.get(t.user_id);
    if (old) clearTimeout(old.timer);
    if (t.is_typing) {
      const timer = setTimeout(() => { state.typers.delete(t.user_id); renderTyping(); }, TYPING_SHOW_MS);
      state.typers.set(t.user_id, { name: t.username || t.user_id, timer });
    } else {
      state.typers.delete(t.user_id);
    }
    renderTyping();
  }

  function renderTyping() {
    const names = Array.from(state.typers.values(), (t) => t.name);
    $("typing").textContent = names.length === 0 ? "" :
      names.join(", ") + (names.length === 1 ? " is typing…" : " are typing…");
  }

  // ------------------------------------------------------------- composer
  // Characters as the server counts them (code points): an emoji is one, not two UTF-16 units.
  const charCount = (text) => Array.from(text.trim()).length;

  // The counter shows near the limit (from 80 %), and says when past it.
  function updateCounter() {
    const max = state.config.max_message_chars;
    const n = charCount($("composer").value);
    const counter = $("char-count");
    counter.hidden = n < max * 0.8;
    counter.textContent = n + " / " + max;
    counter.classList.toggle("over", n > max);
  }

  function touchScreen() { return window.matchMedia("(pointer: coarse)").matches; }

  function submitComposer() {
    const text = $("composer").value.trim();
    if (!state.currentId) return;
    if (state.attachments.length) { sendAttachments(text); return; }
    if (!text) return;
    if (charCount(text) > state.config.max_message_chars) {
      showError("Message too long: " + charCount(text) + " characters, at most " + state.config.max_message_chars + ".");
      return;
    }
    $("composer").value = "";
    updateCounter();
    stopTyping();
    send(text);
  }

  // ------------------------------------------------------------ attachments
  // Files are attached first (shown in #uploads with Remove), then sent with
  // the composer's text as their caption. Each goes to the upload function
  // for a signed URL, then straight to storage; the finalize function checks
  // it and posts the file message, and its row goes when that message arrives.
  const EXT_TYPES = { md: "text/markdown", markdown: "text/markdown", csv: "text/csv", txt: "text/plain", json: "application/json",
    png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp", pdf: "application/pdf" };
  const TYPE_NAMES = { "image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WebP", "application/pdf": "PDF",
    "text/plain": "text", "text/markdown": "Markdown", "text/csv": "CSV", "application/json": "JSON" };

  function contentTypeOf(file) {
    if (file.type) return file.type;
    const ext = (file.name.split(".").pop() || "").toLowerCase();
    return EXT_TYPES[ext] || "application/octet-stream";
  }

  function allowedTypesText() {
    return state.config.allowed_content_types.map((t) => TYPE_NAMES[t] || t).join(", ");
  }

  function uploadRow(file) {
    const status = el("span", { class: "upload-status" }, formatSize(file.size));
    const row = el("li", { class: "upload", "data-filename": file.name, "data-state": "attached" },
      el("span", { class: "upload-name" }, file.name), status);
    $("uploads").append(row);
    return { row, status, progress: null };
  }

  function uploadFailed(ui, text) {
    ui.row.classList.add("error");
    ui.row.dataset.state = "refused";
    if (ui.progress) ui.progress.remove();
    for (const b of ui.row.querySelectorAll("button")) b.remove();
    ui.status.textContent = text;
    ui.status.setAttribute("role", "alert");
    ui.row.append(el("button", { type: "button", class: "dismiss", onclick: () => ui.row.remove() }, "Dismiss"));
  }

  // Why a file cannot be sent, in plain words; null when it can.
  function refusalOf(file, type) {
    const cfg = state.config;
    if (file.size > cfg.max_upload_bytes) {
      return "Too large: " + formatSize(file.size) + " (the limit is " + formatSize(cfg.max_upload_bytes) + ")";
    }
    if (!cfg.allowed_content_types.includes(type)) {
      return "File type not allowed: " + type + ". You can send " + allowedTypesText() + " files.";
    }
    if (file.size === 0) return "This file is empty.";
    return null;
  }

  // An image's preview is drawn on a canvas: the page's CSP allows no blob: or data: images.
  async function drawPreview(file, row) {
    if (!/^image\//.test(file.type) || !window.createImageBitmap) return;
    try {
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(1, 48 / Math.max(bitmap.width, bitmap.height));
      const canvas = el("canvas", { class: "preview", width: Math.max(1, Math.round(bitmap.width * scale)),
        height: Math.max(1, Math.round(bitmap.height * scale)), role: "img", "aria-label": "Preview of " + file.name });
      canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      row.prepend(canvas);
    } catch (e) { /* not decodable here: the name is enough */ }
  }

  function attachFiles(files) {
    if (!state.currentId) { showError("Open a conversation first."); return; }
    for (const file of files) {
      const ui = uploadRow(file);
      const type = contentTypeOf(file);
      const refusal = refusalOf(file, type);
      if (refusal) { uploadFailed(ui, refusal); continue; }
      const item = { file, type, ui };
      ui.row.append(el("button", { type: "button", class: "remove-attachment", "aria-label": "Remove " + file.name,
        onclick: () => { state.attachments = state.attachments.filter((a) => a !== item); ui.row.remove(); updateSendLabel(); } }, "Remove"));
      drawPreview(file, ui.row);
      state.attachments.push(item);
    }
    updateSendLabel();
  }

  function updateSendLabel() {
    const n = state.attachments.length;
    $("send").textContent = n ? "Send " + n + (n === 1 ? " file" : " files") : "Send";
    $("attach-hint").hidden = !n;
  }

  // Sends the attached files; the first carries `caption`.
  function sendAttachments(caption) {
    if (charCount(caption) > state.config.max_message_chars) {
      showError("Caption too long: at most " + state.config.max_message_chars + " characters.");
      return;
    }
    const items = state.attachments;
    state.attachments = [];
    $("composer").value = "";
    updateCounter();
    updateSendLabel();
    items.forEach((item, i) => uploadFile(item, i === 0 ? caption : ""));
  }

  async function uploadFile(item, caption) {
    const cfg = state.config;
    const { file, type, ui } = item;
    for (const b of ui.row.querySelectorAll("button")) b.remove();
    ui.progress = el("progress", { max: "100", value: "0", "aria-label": "Upload progress of " + file.name });
    ui.status.before(ui.progress);
    ui.status.textContent = "requesting…";
    ui.row.dataset.state = "requesting";
    let grant;
    try {
      const body = { conversation_id: state.currentId, filename: file.name, content_type: type, size: file.size };
      if (caption) body.message = caption;
      const r = await fetch(cfg.upload_url, {
        method: "POST",
        headers: { Authorization: "Bearer " + state.token, "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      const data = await r.json().catch(() => null);
      if (r.status !== 201) {
        const why = { 413: "Too large", 415: "File type not allowed", 403: "Not allowed in this conversation", 429: "Too many uploads; try again shortly", 401: "Signed out" }[r.status] || "Refused";
        return uploadFailed(ui, why + ((data && data.error && data.error.message) ? ": " + data.error.message : ""));
      }
      grant = data;
    } catch (e) {
      return uploadFailed(ui, "Upload service unreachable");
    }
    // The bytes go straight to storage, with exactly the signed headers.
    ui.status.textContent = "uploading…";
    ui.row.dataset.state = "uploading";
    await new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open(grant.method || "PUT", grant.url);
      for (const [k, v] of Object.entries(grant.headers || {})) xhr.setRequestHeader(k, v);
      // A storage endpoint that stops answering would leave the upload "uploading" forever:
      // with no progress for upload_stall_seconds, give up and say so.
      const stallMs = (cfg.upload_stall_seconds || 30) * 1000;
      let stall = null;
      const watch = () => {
        clearTimeout(stall);
        stall = setTimeout(() => {
          xhr.onerror = xhr.onload = null;
          xhr.abort();
          uploadFailed(ui, "Upload stalled: storage did not answer for " + Math.round(stallMs / 1000) + " s; try again");
          resolve();
        }, stallMs);
      };
      watch();
      xhr.upload.onprogress = (ev) => {
        watch();
        if (ev.lengthComputable) {
          const pct = Math.round((ev.loaded / ev.total) * 100);
          ui.progress.value = pct;
          ui.status.textContent = pct + "%";
        }
      };
      xhr.onload = () => {
        clearTimeout(stall);
        if (xhr.status >= 200 && xhr.status < 300) {
          ui.progress.value = 100;
          ui.row.dataset.state = "uploaded";
          ui.status.textContent = "uploaded, checking…";  // until its file message arrives (uploadArrived)
          clearError();
        } else {
          uploadFailed(ui, "Storage refused the file (HTTP " + xhr.status + ")");
        }
        resolve();
      };
      xhr.onerror = () => { clearTimeout(stall); uploadFailed(ui, "Upload failed: storage could not be reached"); resolve(); };
      xhr.send(file);
    });
  }

  // One of our files became a message: its "checking…" row has done its job.
  function uploadArrived(message) {
    for (const f of message.files || []) {
      const row = Array.from($("uploads").children).find((r) => r.dataset.state === "uploaded" && r.dataset.filename === f.filename);
      if (row) row.remove();
    }
  }

  function uploadRefusedByServer(e) {
    // The finalize function refused an object after it arrived: the oldest "checking…" row was it.
    const checking = Array.from($("uploads").children).find((r) => r.dataset.state === "uploaded");
    if (checking) checking.remove();
    const row = el("li", { class: "upload error", "data-state": "refused" }, el("span", { role: "alert" }, "Upload refused: " + e.message));
    row.append(el("button", { type: "button", class: "dismiss", onclick: () => row.remove() }, "Dismiss"));
    $("uploads").append(row);
  }

  // ------------------------------------------------- rename and delete (owner)
  function openRename() {
    const c = state.conversations.get(state.currentId);
    if (!c) return;
    $("rename-input").value = c.title || "";
    $("rename-error").textContent = "";
    $("rename").showModal();
    $("rename-input").select();
  }

  async function saveRename() {
    const c = state.conversations.get(state.currentId);
    const title = $("rename-input").value.trim();
    if (!c) { $("rename").close(); return; }
    if (!title) { $("rename-error").textContent = "A title cannot be empty."; return; }
    if (title === c.title) { $("rename").close(); return; }
    try {
      mergeConversation(await http("PATCH", convPath(c.id), { title }));
      $("rename").close();
      renderConversations();
      renderChatHead();
    } catch (e) {
      $("rename-error").textContent = "Could not rename: " + e.message;
    }
  }

  function openDelete() {
    const c = state.conversations.get(state.currentId);
    if (!c) return;
    $("delete-conv-text").textContent = "“" + (c.title || "(untitled)") + "”, its messages and its files are " +
      "deleted for everyone in it. This cannot be undone.";
    $("delete-conv-error").textContent = "";
    $("delete-conv-dialog").showModal();
  }

  async function confirmDelete() {
    const c = state.conversations.get(state.currentId);
    if (!c) { $("delete-conv-dialog").close(); return; }
    $("delete-conv-confirm").disabled = true;
    try {
      await http("DELETE", convPath(c.id));
      $("delete-conv-dialog").close();
      dropConversation(c.id, "deleted");  // a no-op if the server's conversation_updated came first
    } catch (e) {
      $("delete-conv-error").textContent = "Could not delete: " + e.message;
    } finally {
      $("delete-conv-confirm").disabled = false;
    }
  }

  // ---------------------------------------------------------------- profile
  function openProfile() {
    $("profile-name").value = state.me.name || "";
    $("profile-handle").value = state.me.handle || "";
    $("profile-error").textContent = "";
    $("profile").showModal();
  }

  async function saveProfile() {
    const name = $("profile-name").value.trim();
    const handle = $("profile-handle").value.trim().replace(/^@/, "");
    const changes = {};
    if (name && name !== state.me.name) changes.name = name;
    if ((handle || null) !== (state.me.handle || null)) changes.handle = handle || null;
    if (!Object.keys(changes).length) { $("profile").close(); return; }
    try {
      const me = await http("PATCH", "/api/me", changes);
      Object.assign(state.me, { name: me.name, handle: me.handle || null });
      showMe();
      $("profile").close();
    } catch (e) {
      $("profile-error").textContent = e.reason === "handle_taken" ? "The handle @" + handle + " is taken: choose another."
        : "Could not save: " + e.message;
    }
  }

  // ------------------------------------------------------------------- wire
  function bindSignIn() {
    $("signin-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const token = await devSignIn($("signin-name").value);
        if (setToken(token)) start();
      } catch (e) {
        $("signin-error").textContent = "Sign-in failed: " + e.message;
      }
    });
    // jwt mode outside a frame: a token the user pastes themselves.
    $("signin-token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("signin-token").value.trim();
      $("signin-token").value = "";
      offerToken(token);
    });
    $("sign-out").addEventListener("click", signOut);
    $("switch-stay").addEventListener("click", () => $("switch-user").close("stay"));
    $("switch-go").addEventListener("click", () => $("switch-user").close("switch"));
    // A token from the embedding application, e.g.
    // iframe.contentWindow.postMessage({type: "chat-token", token}, chatOrigin).
    window.addEventListener("message", (ev) => {
      if (ev.source !== window.parent || window.parent === window) return;
      const d = ev.data;
      if (!d || d.type !== "chat-token" || typeof d.token !== "string") return;
      if (!TOKEN_PARENT_ORIGINS.includes(ev.origin)) {
        console.warn("chat: ignored a token posted by " + ev.origin + ", which is not in TOKEN_PARENT_ORIGINS");
        return;
      }
      offerToken(d.token);
    });
  }

  function bindConversations() {
    $("new-conv-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const c = await http("POST", "/api/conversations", { title: $("new-conv-title").value.trim() || undefined });
        $("new-conv-title").value = "";
        mergeConversation(c);
        clearError();
        switchConversation(c.id);
      } catch (e) {
        showError("Could not create the conversation: " + e.message);
      }
    });
    $("refresh-convs").addEventListener("click", () => loadConversations(true));
    $("more-convs").addEventListener("click", () => loadConversations(false));
    $("back").addEventListener("click", () => {
      showScreen("list");
      const current = $("conversations").querySelector('button[aria-current="true"]');
      if (current) current.focus();
    });
    $("add-people").addEventListener("click", () => {
      const form = $("add-participant-form");
      if (!form.hidden) { hideAddForm(); return; }
      form.hidden = false;
      $("add-people").setAttribute("aria-expanded", "true");
      $("participant-query").focus();
    });
    $("add-participant-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const query = $("participant-query").value.trim();
      if (query) findParticipant(query);
    });
    $("participant-query").addEventListener("input", () => { found = null; $("participant-found").hidden = true; });
    $("participant-confirm").addEventListener("click", addFoundParticipant);
    $("participant-cancel").addEventListener("click", hideAddForm);
    $("ai-mode").addEventListener("change", () => setAiMode($("ai-mode").value));
    $("rename-conv").addEventListener("click", openRename);
    $("rename-form").addEventListener("submit", (ev) => { ev.preventDefault(); saveRename(); });
    $("rename-cancel").addEventListener("click", () => $("rename").close());
    $("delete-conv").addEventListener("click", openDelete);
    $("delete-conv-confirm").addEventListener("click", confirmDelete);
    $("delete-conv-cancel").addEventListener("click", () => $("delete-conv-dialog").close());
    $("me").addEventListener("click", openProfile);
    $("profile-form").addEventListener("submit", (ev) => { ev.preventDefault(); saveProfile(); });
    $("profile-cancel").addEventListener("click", () => $("profile").close());
  }

  function bindComposer() {
    $("composer-form").addEventListener("submit", (ev) => { ev.preventDefault(); submitComposer(); });
    $("composer").addEventListener("keydown", (ev) => {
      // Enter sends on a keyboard; on a touch screen it makes a new line and the Send button sends.
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && !touchScreen()) {
        ev.preventDefault();
        submitComposer();
      }
    });
    $("composer").addEventListener("input", () => { typingInput(); updateCounter(); });
    $("stop").addEventListener("click", stopReply);
    // Escape stops the reply being written (unless a dialog is open: there it closes the dialog).
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && !ev.defaultPrevented && state.currentId && generating() && !document.querySelector("dialog[open]")) stopReply();
    });
    $("file-input").addEventListener("change", (ev) => { attachFiles(Array.from(ev.target.files)); ev.target.value = ""; });
    const chat = $("chat");
    chat.addEventListener("dragover", (ev) => { ev.preventDefault(); chat.classList.add("dropping"); });
    chat.addEventListener("dragleave", () => chat.classList.remove("dropping"));
    chat.addEventListener("drop", (ev) => {
      ev.preventDefault();
      chat.classList.remove("dropping");
      if (ev.dataTransfer && ev.dataTransfer.files.length) attachFiles(Array.from(ev.dataTransfer.files));
    });
    $("skip-link").addEventListener("click", (ev) => {
      ev.preventDefault();  // no #fragment in the address: the page reads it for sign-in links
      if (!$("composer-form").hidden) { showScreen("chat"); $("composer").focus(); } else $("conversations").focus();
    });
  }

  function bindMessages() {
    $("load-older").addEventListener("click", () => loadOlder());
    $("messages").addEventListener("scroll", () => {
      if ($("messages").scrollTop < 80) loadOlder();
      scheduleMarkRead();
    });
    document.addEventListener("visibilitychange", scheduleMarkRead);
    window.addEventListener("online", () => {
      setConn($("conn-state").dataset.state, "Reconnecting…");
      if (state.socket && !state.socket.connected) state.socket.connect();
    });
    window.addEventListener("offline", () => setConn(state.socket && state.socket.connected ? "connected" : "reconnecting", "Offline"));
    setInterval(refreshTimes, 30000);
  }

  async function main() {
    bindSignIn();
    bindConversations();
    bindComposer();
    bindMessages();
    try {
      state.config = await http("GET", "/config.json");
    } catch (e) {
      $("signin-error").textContent = "Cannot load the configuration: " + e.message;
      $("signin").hidden = false;
      return;
    }
    const provider = $("provider");
    provider.hidden = false;
    provider.textContent = state.config.ai_provider === "offline"
      ? "AI: offline stand-in (local, not a model)" : "AI: " + state.config.ai_provider;
    $("file-input").accept = state.config.allowed_content_types.join(",");
    const dev = state.config.auth_mode === "dev";
    const linked = takeFragmentToken();  // always taken out of the address bar, even when not used
    const stored = sessionStorage.getItem(TOKEN_KEY);
    if (liveClaims(stored) && setToken(stored)) start();
    else sessionStorage.removeItem(TOKEN_KEY);
    if (linked && dev) await offerToken(linked);  // asks first if it is someone else's
    const ignored = linked && !dev ? IGNORED_LINK : "";
    if (state.token) { if (ignored) notice(ignored, true); return; }
    showSignIn(ignored);
    if (!dev && window.parent !== window) window.parent.postMessage({ type: "chat-ready" }, "*");
  }

  main();
})();
