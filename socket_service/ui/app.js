// The chat page. It speaks only the public protocol (PROTOCOL.md): the HTTP
// API of the socket service, Socket.IO v4 events, and the upload function.
// Vendor libraries (io, marked, DOMPurify) come from pinned npm packages.
"use strict";

(function () {
  // The page's own elements, looked up once, at start-up (the script is
  // deferred: the page is parsed). Nothing rendered later, such as a reply's
  // Markdown, can take the place of one by carrying its id (issue 13, finding 1).
  const ELEMENTS = new Map(Array.from(document.querySelectorAll("[id]"), (node) => [node.id, node]));
  const $ = (id) => ELEMENTS.get(id);
  const TOKEN_KEY = "chat.token";
  const CONV_KEY = "chat.conversation";
  const TYPING_SEND_MS = 2000;   // at most one typing=true per 2 s
  const TYPING_IDLE_MS = 3000;   // typing=false after 3 s without a key
  const TYPING_SHOW_MS = 5000;   // a remote "is typing" fades after 5 s
  const ACK_TIMEOUT_MS = 15000;

  const state = {
    config: null,
    token: null,
    me: null,               // {id, name}
    socket: null,
    conversations: new Map(),
    currentId: null,
    nextBefore: null,
    loadingOlder: false,
    historyLoaded: false,
    inRoom: false,          // false after a disconnect or left_room: the next send joins again
    msgs: new Map(),        // message_id -> message state
    local: new Map(),       // client_message_id -> message state (own messages)
    typers: new Map(),      // user_id -> {name, timer}
    lastTypingSent: 0,
    typingIdle: null,
    convCursor: null,
    manualReconnect: null,
    manualAttempts: 0,
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

  function safeUrl(url) {
    try {
      const u = new URL(url, location.href);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  function formatSize(n) {
    if (n >= 1048576) return (n / 1048576).toFixed(1) + " MB";
    if (n >= 1024) return Math.round(n / 1024) + " KB";
    return n + " B";
  }

  function notice(text, isError) {
    const n = $("chat-notice");
    n.textContent = text || "";
    n.classList.toggle("error", !!isError);
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
      throw err;
    }
    return data;
  }

  // Markdown for assistant replies: marked, then DOMPurify with allow-lists
  // (issue 13, findings 1 and 2). A reply is written by a model that may
  // follow instructions hidden in a file, and every participant sees it:
  // - only the tags Markdown makes: no script, style, form control or button;
  // - only these attributes: no id or name (which could stand in for an
  //   element of the page), no class, style, data-* or aria-*;
  // - images become links, so showing a reply fetches nothing from anywhere
  //   (an image URL could carry conversation text to a stranger's server).
  const MARKDOWN = {
    ALLOWED_TAGS: ["a", "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code", "pre",
      "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "sup", "sub",
      "img"],  // only to be turned into a link below
    ALLOWED_ATTR: ["href", "title", "alt", "src", "start", "align"],
    ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false,
    RETURN_DOM_FRAGMENT: true,  // in DOMPurify's own inert document: an <img> there loads nothing
  };
  window.DOMPurify && DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") { node.setAttribute("rel", "noopener noreferrer"); node.setAttribute("target", "_blank"); }
  });

  function imageAsLink(img) {
    const url = safeUrl(img.getAttribute("src") || "");
    const label = "Image: " + (img.getAttribute("alt") || url || "(no address)");
    const link = img.ownerDocument.createElement(url ? "a" : "span");
    link.textContent = label;
    if (url) {
      link.setAttribute("href", url);
      link.setAttribute("title", url);  // where it leads, before anyone clicks
      link.setAttribute("rel", "noopener noreferrer");
      link.setAttribute("target", "_blank");
    }
    return link;
  }

  function renderMarkdown(target, text) {
    const html = marked.parse(text || "", { gfm: true, breaks: true, async: false });
    const fragment = DOMPurify.sanitize(html, MARKDOWN);
    for (const img of fragment.querySelectorAll("img")) img.replaceWith(imageAsLink(img));
    target.replaceChildren(fragment);  // into the page only now, without images
  }

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

  function userOf(claims) { return { id: claims.sub, name: claims.name || claims.sub }; }
  function userLabel(user) { return user.name + " (" + user.id + ")"; }

  function setToken(token) {
    const claims = decodeJwt(token);
    if (!claims || !claims.sub) {
      $("signin-error").textContent = "That token cannot be read.";
      return false;
    }
    state.token = token;
    state.me = userOf(claims);
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
    state.token = null;
    state.me = null;
    if (state.socket) { state.socket.disconnect(); state.socket = null; }
    clearTimeout(state.manualReconnect);
    state.currentId = null;
    showSignIn();
  }

  async function start() {
    $("me").textContent = userLabel(state.me);
    $("me").hidden = false;
    $("sign-out").hidden = false;
    $("signin").hidden = true;
    $("app").hidden = false;
    connect();
    await loadConversations(true);
    const remembered = sessionStorage.getItem(CONV_KEY);
    if (remembered && state.conversations.has(remembered)) switchConversation(remembered);
  }

  // ------------------------------------------------------------- connection
  function setConn(kind, text) {
    const c = $("conn-state");
    c.dataset.state = kind;
    c.textContent = text;
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

    socket.on("connect", () => {
      state.manualAttempts = 0;
      setConn("connected", "Connected");
      if (state.currentId) joinCurrent();
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
      notice((e && e.message) || "error", true);
    });
    socket.on("new_message", (m) => { if (m.conversation_id === state.currentId) onUserMessage(m); });
    socket.on("file_uploaded", (m) => { if (m.conversation_id === state.currentId) onUserMessage(m); });
    socket.on("ai_thinking", (m) => {
      if (m.conversation_id !== state.currentId) return;
      const msg = ensureAssistant(m.message_id);
      if (!isDone(msg)) { msg.status = msg.status === "streaming" ? "streaming" : "pending"; renderMessage(msg); }
      updateStop();
    });
    socket.on("ai_response_chunk", (c) => { if (c.conversation_id === state.currentId) onChunk(c); });
    socket.on("ai_response_complete", (m) => {
      if (m.conversation_id !== state.currentId) return;
      const msg = ensureAssistant(m.message_id);
      msg.content = m.content;
      msg.status = m.status;
      msg.timestamp = m.timestamp;
      renderMessage(msg);
      updateStop();
    });
    socket.on("ai_response_error", (m) => {
      if (m.conversation_id !== state.currentId) return;
      const msg = ensureAssistant(m.message_id);
      msg.status = "error";
      msg.error = m.error;
      renderMessage(msg);
      updateStop();
    });
    socket.on("user_typing", onUserTyping);
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

  function emitAck(event, payload) {
    return new Promise((resolve) => {
      state.socket.timeout(ACK_TIMEOUT_MS).emit(event, payload, (err, ack) => {
        if (err) resolve({ ok: false, error: { code: "unavailable", message: "no answer from the server" } });
        else resolve(ack || { ok: false, error: { code: "internal", message: "empty answer" } });
      });
    });
  }

  // ----------------------------------------------------------- conversations
  async function loadConversations(reset) {
    if (reset) state.convCursor = null;
    try {
      const page = await http("GET", "/api/conversations?limit=50" + (state.convCursor ? "&cursor=" + encodeURIComponent(state.convCursor) : ""));
      if (reset) {
        // A page requested before a conversation was created here may not have it yet: keep the open one.
        const open = state.conversations.get(state.currentId);
        state.conversations.clear();
        if (open && !page.items.some((c) => c.id === open.id)) state.conversations.set(open.id, open);
      }
      for (const c of page.items) state.conversations.set(c.id, c);
      state.convCursor = page.next_cursor;
      $("more-convs").hidden = !page.next_cursor;
      renderConversations();
    } catch (e) {
      if (e.status === 401) { signOut(); showSignIn("Your session has ended; please sign in again."); return; }
      notice("Could not load conversations: " + e.message, true);
    }
  }

  function renderConversations() {
    const list = $("conversations");
    list.replaceChildren();
    for (const c of state.conversations.values()) {
      const b = el("button", { type: "button", class: "conv", "data-id": c.id, "aria-current": c.id === state.currentId ? "true" : null,
        onclick: () => switchConversation(c.id) }, c.title || "(untitled)");
      list.append(el("li", {}, b));
    }
  }

  function renderChatHead() {
    const c = state.conversations.get(state.currentId);
    $("chat-title").textContent = c ? (c.title || "(untitled)") : "No conversation selected";
    $("participants").textContent = c ? "Participants: " + c.participants.join(", ") : "";
    $("add-participant-form").hidden = !(c && state.me && c.owner_id === state.me.id);
    $("composer-form").hidden = !c;
  }

  async function switchConversation(id) {
    if (state.currentId && state.currentId !== id && state.socket && state.socket.connected) {
      state.socket.emit("leave_room", { conversation_id: state.currentId }, () => {});
    }
    state.currentId = id;
    sessionStorage.setItem(CONV_KEY, id);
    state.msgs.clear();
    state.local.clear();
    state.nextBefore = null;
    state.historyLoaded = false;
    state.inRoom = false;
    for (const t of state.typers.values()) clearTimeout(t.timer);
    state.typers.clear();
    renderTyping();
    $("message-list").replaceChildren();
    $("load-older").hidden = true;
    notice("");
    renderConversations();
    renderChatHead();
    updateStop();
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
      page = await http("GET", "/api/conversations/" + encodeURIComponent(id) + "/messages?limit=50" + (before ? "&before=" + encodeURIComponent(before) : ""));
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
  }

  // --------------------------------------------------------------- messages
  function isDone(m) { return m.status === "complete" || m.status === "cancelled" || m.status === "error"; }

  function newMessage(fields) {
    const m = Object.assign({ id: null, cmid: null, role: "user", content: "", status: "complete", user_id: null,
      files: null, timestamp: null, base: "", baseSeq: 0, chunks: new Map(), error: null, el: null }, fields);
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
      } else {
        m.content = item.content; m.files = item.files || m.files; m.status = "complete";
      }
      if (!m.id) { m.id = item.message_id; state.msgs.set(m.id, m); }
      renderMessage(m);
      return;
    }
    m = newMessage({ id: item.message_id, role: item.role, content: item.content, status: item.status || "complete",
      user_id: item.user_id || null, files: item.files || null, timestamp: item.timestamp, cmid: item.client_message_id || null });
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
      renderMessage(m);
      return;
    }
    m = newMessage({ id: wire.message_id, role: "user", content: wire.content, user_id: wire.user_id,
      files: wire.files || null, timestamp: wire.timestamp, cmid: wire.client_message_id || null });
    state.msgs.set(m.id, m);
    place(m);
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

  function authorLabel(m) {
    if (m.role === "assistant") {
      return state.config && state.config.ai_provider === "offline" ? "Offline stand-in (not an AI model)" : "Assistant";
    }
    if (state.me && m.user_id === state.me.id) return "You";
    if (!m.user_id) return "You";
    return m.user_id;
  }

  function renderFiles(files) {
    const box = el("div", { class: "files" });
    for (const f of files) {
      const url = f.url ? safeUrl(f.url) : null;
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
    const head = el("div", { class: "msg-head" }, el("span", { class: "author" }, authorLabel(m)));
    if (m.role === "assistant") {
      const labels = { pending: "thinking…", streaming: "writing…", cancelled: "stopped", error: "failed" };
      if (labels[m.status]) head.append(el("span", { class: "state" }, labels[m.status]));
    } else if (m.status === "sending") {
      head.append(el("span", { class: "state" }, "sending…"));
    }
    const body = el("div", { class: "content" });
    if (m.role === "assistant") renderMarkdown(body, m.content);
    else body.textContent = m.content;  // user text is shown as typed, never parsed as HTML
    const parts = [head, body];
    if (m.files && m.files.length) parts.push(renderFiles(m.files));
    if (m.error) {
      const err = el("p", { class: "msg-error", role: "alert" }, (m.error.message || m.error.code || "failed") + " ");
      err.append(el("button", { type: "button", class: "retry", onclick: () => retry(m) }, "Retry"));
      parts.push(err);
    }
    m.el.replaceChildren(...parts);
    if (follow) box.scrollTop = box.scrollHeight;  // a reader at the bottom follows a growing reply
  }

  // ------------------------------------------------------------------ send
  async function send(text, reuse) {
    const cid = state.currentId;
    const m = reuse || newMessage({ role: "user", content: text, user_id: state.me.id, status: "sending", cmid: uuid() });
    m.status = "sending";
    m.error = null;
    if (!reuse) { state.local.set(m.cmid, m); place(m); }
    renderMessage(m);
    $("messages").scrollTop = $("messages").scrollHeight;
    if (!state.inRoom && state.socket.connected) await joinCurrent();  // e.g. removed, then added back
    const ack = await emitAck("send_message", { conversation_id: cid, message: m.content, client_message_id: m.cmid });
    if (ack.ok) {
      if (!m.id) { m.id = ack.message_id; state.msgs.set(m.id, m); }
      if (m.status === "sending") m.status = "complete";
    } else {
      m.status = "failed";
      m.error = ack.error;
    }
    renderMessage(m);
  }

  function retry(m) {
    if (m.role === "user") { send(m.content, m); return; }
    // A failed reply: ask again with the user message that preceded it.
    let prev = m.el.previousElementSibling;
    while (prev && prev.dataset.role !== "user") prev = prev.previousElementSibling;
    const source = prev && (state.msgs.get(prev.dataset.id) || state.local.get(prev.dataset.cmid));
    if (source) send(source.content);
  }

  function updateStop() {
    let generating = false;
    for (const m of state.msgs.values()) if (m.role === "assistant" && !isDone(m)) generating = true;
    $("stop").hidden = !generating;
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

  // ---------------------------------------------------------------- uploads
  const EXT_TYPES = { md: "text/markdown", markdown: "text/markdown", csv: "text/csv", txt: "text/plain", json: "application/json",
    png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp", pdf: "application/pdf" };

  function contentTypeOf(file) {
    if (file.type) return file.type;
    const ext = (file.name.split(".").pop() || "").toLowerCase();
    return EXT_TYPES[ext] || "application/octet-stream";
  }

  function uploadRow(file) {
    const progress = el("progress", { max: "100", value: "0", "aria-label": "Upload progress of " + file.name });
    const status = el("span", { class: "upload-status" }, "waiting…");
    const row = el("li", { class: "upload", "data-filename": file.name }, el("span", { class: "upload-name" }, file.name), progress, status);
    $("uploads").append(row);
    return { row, progress, status };
  }

  function uploadFailed(ui, text) {
    ui.row.classList.add("error");
    ui.row.dataset.state = "refused";
    ui.progress.remove();
    ui.status.textContent = text;
    ui.status.setAttribute("role", "alert");
    ui.row.append(el("button", { type: "button", class: "dismiss", onclick: () => ui.row.remove() }, "Dismiss"));
  }

  function uploadRefusedByServer(e) {
    // The finalize function refused an object after it arrived.
    const row = el("li", { class: "upload error", "data-state": "refused" }, el("span", { role: "alert" }, "Upload refused: " + e.message));
    row.append(el("button", { type: "button", class: "dismiss", onclick: () => row.remove() }, "Dismiss"));
    $("uploads").append(row);
  }

  async function uploadFile(file) {
    const cfg = state.config;
    const ui = uploadRow(file);
    const type = contentTypeOf(file);
    if (file.size > cfg.max_upload_bytes) {
      return uploadFailed(ui, "Too large: " + formatSize(file.size) + " (the limit is " + formatSize(cfg.max_upload_bytes) + ")");
    }
    if (!cfg.allowed_content_types.includes(type)) {
      return uploadFailed(ui, "File type not allowed: " + type);
    }
    ui.status.textContent = "requesting…";
    let grant;
    try {
      const r = await fetch(cfg.upload_url, {
        method: "POST",
        headers: { Authorization: "Bearer " + state.token, "Content-Type": "application/json" },
        body: JSON.stringify({ conversation_id: state.currentId, filename: file.name, content_type: type, size: file.size }),
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
          ui.status.textContent = "uploaded, checking…";
          setTimeout(() => ui.row.remove(), 8000);
        } else {
          uploadFailed(ui, "Storage refused the file (HTTP " + xhr.status + ")");
        }
        resolve();
      };
      xhr.onerror = () => { clearTimeout(stall); uploadFailed(ui, "Upload failed: storage could not be reached"); resolve(); };
      xhr.send(file);
    });
  }

  function uploadFiles(files) {
    if (!state.currentId) { notice("Open a conversation first.", true); return; }
    for (const f of files) uploadFile(f);
  }

  // ------------------------------------------------------------------- wire
  function bindUi() {
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
    $("new-conv-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const c = await http("POST", "/api/conversations", { title: $("new-conv-title").value.trim() || undefined });
        $("new-conv-title").value = "";
        state.conversations = new Map([[c.id, c], ...state.conversations]);
        renderConversations();
        switchConversation(c.id);
        $("composer").focus();
      } catch (e) {
        notice("Could not create the conversation: " + e.message, true);
      }
    });
    $("refresh-convs").addEventListener("click", () => loadConversations(true));
    $("more-convs").addEventListener("click", () => loadConversations(false));
    $("add-participant-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const userId = $("participant-id").value.trim();
      try {
        const r = await http("POST", "/api/conversations/" + encodeURIComponent(state.currentId) + "/participants", { user_id: userId });
        const c = state.conversations.get(state.currentId);
        if (c) c.participants = r.participants;
        $("participant-id").value = "";
        renderChatHead();
        notice("Added " + userId + ".");
      } catch (e) {
        notice("Could not add " + userId + ": " + e.message, true);
      }
    });
    $("composer-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = $("composer").value;
      if (!text.trim() || !state.currentId) return;
      // Characters as the server counts them (code points): an emoji is one, not two UTF-16 units.
      if (Array.from(text.trim()).length > state.config.max_message_chars) {
        notice("Message too long (at most " + state.config.max_message_chars + " characters).", true);
        return;
      }
      $("composer").value = "";
      stopTyping();
      send(text.trim());
    });
    $("composer").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $("composer-form").requestSubmit();
      }
    });
    $("composer").addEventListener("input", typingInput);
    $("stop").addEventListener("click", async () => {
      const ack = await emitAck("stop_generation", { conversation_id: state.currentId });
      if (!ack.ok && ack.error.code !== "not_found") notice("Could not stop: " + ack.error.message, true);
    });
    $("file-input").addEventListener("change", (ev) => { uploadFiles(Array.from(ev.target.files)); ev.target.value = ""; });
    const chat = $("chat");
    chat.addEventListener("dragover", (ev) => { ev.preventDefault(); chat.classList.add("dropping"); });
    chat.addEventListener("dragleave", () => chat.classList.remove("dropping"));
    chat.addEventListener("drop", (ev) => {
      ev.preventDefault();
      chat.classList.remove("dropping");
      if (ev.dataTransfer && ev.dataTransfer.files.length) uploadFiles(Array.from(ev.dataTransfer.files));
    });
    $("load-older").addEventListener("click", () => loadOlder());
    $("messages").addEventListener("scroll", () => { if ($("messages").scrollTop < 80) loadOlder(); });
    window.addEventListener("online", () => { if (state.socket && !state.socket.connected) state.socket.connect(); });
    window.addEventListener("offline", () => setConn("reconnecting", "Offline; waiting for the network…"));
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

  async function loadOlder() {
    if (state.loadingOlder || !state.nextBefore || !state.currentId) return;
    state.loadingOlder = true;
    try { await loadHistory("older"); } finally { state.loadingOlder = false; }
  }

  async function main() {
    bindUi();
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
