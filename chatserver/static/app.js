// The chatserver web client: protocol v1 over the WebSocket at ./ws, no build step.
//
// What it keeps per room, so that a dropped connection (server restart: close
// 1001; a network drop: no close at all, found by our own pings) loses nothing
// and shows nothing twice:
//   cursor  every message up to this id has been received (or predates the first
//           join); after a reconnect the room asks `history` `after: cursor`,
//           page by page until `more` is false;
//   seen    the ids shown: the de-duplication key, with the room name;
//   held    live messages that arrive while the catch-up runs, shown after it in
//           id order.
// Our own messages stay "pending" until their `ack`. Each carries a `cid` of its
// own (protocol 1.1), kept for good: the ack, the live copy and history carry it
// back. One whose ack was lost with the connection is looked for in the catch-up
// by cid: found, it was stored; not found, it is sent again with the same cid, and
// the server answers a repeat with the stored id (`duplicate`), never a copy.
//
// Edits and deletes are events of the room, with ids of their own: a `message`
// with `edits` or `deletes` changes its target and is never shown as a line.
// History folds them (`edited`, `deleted`). Each message shown keeps `data-rev`,
// the newest id its state includes (a page's messages: the page's last id, as
// everything up to it was stored before the read); an edit event applies only
// past it, so a page's own events, already folded, change nothing.
//
// Unread counts and read markers (protocol 1.1) come from the server: `joined`
// says how many messages by others follow the user's marker (`unread`, counted
// up to its `last_id`); from there on, each new message by someone else that
// the user is not reading adds one (events never do). The user is reading a
// room when it is open, the tab is visible and the newest messages are on
// screen: its count goes to 0 and a `read` with the newest id shown follows, at
// most one per room per READ_EVERY, only past the known marker, and only in the
// room the frame pacing leaves (a user's own sends never wait behind one). A
// `read` from another device of the user moves the marker (the highest is
// kept), which clears the count once it reaches the newest id known.
//
// Typing: input in the composer sends `typing` for the open room at most once
// per TYPING_EVERY (never for an empty field, never on send); others' `typing`
// shows under the messages for TYPING_SHOWN, or until that user's next message.
//
// Presence (protocol 1.1): every join (rejoins too) asks `presence: true`. Per
// room the page keeps `online`, the names it knows to be online, and
// `onlineCount`, the exact count: `joined` and every list (a burst's, the one
// after a join, the answer to a request) replace both. An event adjusts them:
// an unknown name coming online is added (+1); a known one leaving is removed
// (-1); an unlisted one leaving a partial list (count > names) is -1, never
// below the names known. Null (the state unavailable), an old server or no
// connection: unknown, and nothing is shown rather than a wrong number; the
// open room asks again (`presence`), backing off. Only the open room shows it,
// as "3 online" in its header, a button that opens the list ("and N more" when
// partial). Nothing goes to the message log: arrivals are never announced.
"use strict";

(() => {
  const NAME = /^[A-Za-z0-9_.:-]{1,64}$/;
  const BACKLOG = 50; // messages shown when a room is first joined
  const PAGE = 100; // catch-up page (the protocol's largest `limit`)
  const OLDER = 50; // "Load older messages" page
  const PING_EVERY = 25000; // ms; a network drop sends no close, so we ask
  const PONG_WAIT = 10000;
  const READ_EVERY = 1000; // ms between two read markers of one room
  const TYPING_EVERY = 2000; // ms between two `typing` frames of one room
  const TYPING_SHOWN = 4000; // ms "bob is typing…" stays without a new frame
  const TYPING_REF = "typing"; // no answer comes: errors only, kept quiet
  const PRESENCE_RETRY = 5000; // ms before the open room asks again for an unknown list
  const PRESENCE_RETRY_MAX = 60000;
  const ONLINE_SHOWN = 200; // names rendered in the open list; the rest is "and N more"
  const FATAL = {
    4001: "Your token has expired: get a new one and reload the page.",
    4003: "You are banned from this server.",
  };

  // Exponential backoff with "equal jitter": the n-th retry waits between half
  // and all of min(cap, base * 2^n) seconds. Growth spares a server that is
  // down; jitter spreads the clients of a restarted server over the window.
  class Backoff {
    constructor(base = 0.5, cap = 30) {
      this.base = base;
      this.cap = cap;
      this.attempt = 0;
    }
    next() {
      const ceiling = Math.min(this.cap, this.base * 2 ** Math.min(this.attempt, 32));
      this.attempt += 1;
      return ceiling / 2 + Math.random() * (ceiling / 2);
    }
    reset() {
      this.attempt = 0;
    }
  }

  // Pacing below the server's rate limit (20 frames/s, burst 40 by default):
  // rejoining many rooms at once must not be answered `rate_limited`.
  class Bucket {
    constructor(rate = 10, burst = 20) {
      this.rate = rate;
      this.burst = burst;
      this.tokens = burst;
      this.at = performance.now() / 1000;
    }
    delay() {
      const now = performance.now() / 1000;
      this.tokens = Math.min(this.burst, this.tokens + (now - this.at) * this.rate);
      this.at = now;
      return this.tokens >= 1 ? 0 : (1 - this.tokens) / this.rate;
    }
    take() {
      this.tokens -= 1;
    }
    // Seconds until `n` tokens are there (0: now): optional frames (read markers,
    // typing) go only when the queue ahead of them and a spare token fit.
    spare(n) {
      this.delay();
      return this.tokens >= n ? 0 : (n - this.tokens) / this.rate;
    }
  }

  // A message's cid (1-64 of A-Z a-z 0-9 _ -). randomUUID exists only in a secure
  // context: a page served over plain http on a LAN address has none.
  function newCid() {
    if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    login: $("login"),
    loginForm: $("login-form"),
    name: $("name"),
    tokenNote: $("token-note"),
    errors: $("errors"),
    chat: $("chat"),
    rooms: $("rooms"),
    joinForm: $("join-form"),
    room: $("room"),
    title: $("room-title"),
    messages: $("messages"),
    older: $("older"),
    typing: $("typing"),
    presence: $("presence"),
    presenceToggle: $("presence-toggle"),
    onlineCount: $("online-count"),
    onlinePanel: $("online-panel"),
    onlineList: $("online-list"),
    composer: $("composer"),
    message: $("message"),
  };

  const app = {
    user: null,
    token: null,
    ws: null,
    online: false,
    everOpened: false, // "Reconnecting…" rather than "Connecting…"
    resumed: false, // every room caught up on this connection
    stopped: false, // a close after which reconnecting cannot help
    rooms: new Map(), // name -> room state, in join order
    current: null,
    pending: new Map(), // ref -> {purpose, room}
    outbox: [], // our sends, edits and deletes not known to be stored
    refs: 0,
    locals: 0,
    backoff: new Backoff(),
    bucket: new Bucket(),
    queue: [],
    timers: { pump: null, retry: null, ping: null, pong: null },
    presenceFrame: null, // the open room's presence, redrawn once per animation frame
  };

  // --- storage (a page reload keeps the name and the rooms) -----------------

  function load(key, fallback) {
    try {
      const value = localStorage.getItem(key);
      return value === null ? fallback : JSON.parse(value);
    } catch {
      return fallback;
    }
  }

  function save(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch {
      // private mode or storage full: the page works, it just won't remember
    }
  }

  function saveRooms() {
    save(`chat.rooms.${app.user}`, [...app.rooms.keys()]);
  }

  // --- status and errors -----------------------------------------------------

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text;
    document.body.dataset.state = state;
  }

  function showError(code, message) {
    const li = document.createElement("li");
    li.className = "error";
    li.dataset.code = code;
    const text = document.createElement("span");
    const strong = document.createElement("strong");
    strong.textContent = code;
    text.append(strong, `: ${message}`);
    const close = document.createElement("button");
    close.type = "button";
    close.className = "dismiss";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    close.addEventListener("click", () => li.remove());
    li.append(text, close);
    ui.errors.append(li);
    while (ui.errors.children.length > 5) ui.errors.firstElementChild.remove();
  }

  // --- rooms -----------------------------------------------------------------

  function addRoom(name) {
    const log = document.createElement("ol");
    log.className = "log";
    log.dataset.room = name;
    log.hidden = true;
    ui.messages.append(log);

    const li = document.createElement("li");
    li.dataset.room = name;
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "pick";
    pick.dataset.room = name;
    const label = document.createElement("span");
    label.textContent = name;
    const unread = document.createElement("span");
    unread.className = "unread";
    pick.append(label, unread);
    pick.setAttribute("aria-label", name);
    pick.addEventListener("click", () => selectRoom(name));
    const leave = document.createElement("button");
    leave.type = "button";
    leave.className = "leave";
    leave.dataset.room = name;
    leave.title = `Leave ${name}`;
    leave.setAttribute("aria-label", `Leave ${name}`);
    leave.textContent = "×";
    leave.addEventListener("click", () => leaveRoom(name));
    li.append(pick, leave);
    ui.rooms.append(li);

    li.dataset.phase = "offline";
    const room = {
      name,
      cursor: null,
      oldest: null,
      seen: new Set(),
      orphans: new Map(), // target id -> latest edit or delete of a message not shown
      phase: "offline",
      held: [],
      start: false, // no older messages exist
      loadingOlder: false,
      unread: 0, // messages by others after the marker (the server's count, then live)
      counted: 0, // the server's count includes every id up to this (joined's last_id)
      newest: 0, // the newest id delivered (events included): what a marker may say
      read: 0, // the marker the server is known to have
      readUpTo: 0, // the newest id the user has had on screen
      readSent: 0, // the last marker sent on this connection
      readAt: -Infinity, // when (performance.now())
      readTimer: null,
      typingAt: -Infinity, // when our last `typing` for this room went
      typers: new Map(), // user -> timer that forgets them
      watching: false, // joined with presence on this connection (the server has it)
      online: null, // names known to be online, or null: unknown
      onlineCount: null, // the exact count (>= online.size), or null
      presenceTimer: null, // the next `presence` request, while unknown
      presenceWait: PRESENCE_RETRY,
      presenceAsking: false,
      log,
      item: li,
      pick,
    };
    app.rooms.set(name, room);
    return room;
  }

  // offline -> joining -> (backlog | catchup) -> live; shown as data-phase on the
  // room's entry, so a reader (or a test) can tell a room that is caught up.
  function setPhase(room, phase) {
    room.phase = phase;
    room.item.dataset.phase = phase;
  }

  function removeRoom(name) {
    const room = app.rooms.get(name);
    if (!room) return;
    app.rooms.delete(name);
    clearTimeout(room.readTimer);
    clearTimeout(room.presenceTimer);
    for (const timer of room.typers.values()) clearTimeout(timer);
    room.log.remove();
    room.item.remove();
    app.outbox = app.outbox.filter((item) => item.room !== name);
    if (app.current === name) {
      const rest = [...app.rooms.keys()];
      selectRoom(rest.length ? rest[rest.length - 1] : null);
    }
    saveRooms();
  }

  function selectRoom(name) {
    app.current = name;
    for (const room of app.rooms.values()) {
      const active = room.name === name;
      room.log.hidden = !active;
      room.item.classList.toggle("active", active);
      if (active) room.pick.setAttribute("aria-current", "true");
      else room.pick.removeAttribute("aria-current");
    }
    ui.title.textContent = name ? `#${name}` : "No room yet: join one";
    ui.chat.dataset.room = name || "";
    updateOlder();
    scrollToBottom();
    showTyping();
    setExpanded(false);
    showPresence();
    const room = app.rooms.get(name);
    if (room) {
      noteRead(room);
      askPresence(room);
    }
  }

  // --- unread counts and read markers -------------------------------------------

  function setUnread(room, count) {
    room.unread = Math.max(0, count);
    room.item.querySelector(".unread").textContent = room.unread ? String(room.unread) : "";
    room.pick.setAttribute(
      "aria-label",
      room.unread ? `${room.name}, ${room.unread} unread` : room.name,
    );
  }

  // Open, visible, caught up and scrolled to the bottom: the newest is on screen.
  function reading(room) {
    return (
      room.name === app.current &&
      room.phase === "live" &&
      document.visibilityState === "visible" &&
      !ui.chat.hidden &&
      nearBottom()
    );
  }

  function noteRead(room) {
    if (!reading(room)) return;
    room.readUpTo = Math.max(room.readUpTo, room.newest);
    if (room.unread) setUnread(room, 0);
    flushRead(room);
  }

  // Coalesced: one marker per room per READ_EVERY, the newest read by then.
  function flushRead(room) {
    if (room.readTimer !== null) return;
    if (!app.online || room.phase !== "live") return; // goLive comes back here
    if (room.readUpTo <= Math.max(room.read, room.readSent)) return;
    const now = performance.now();
    const wait = Math.max(
      room.readAt + READ_EVERY - now,
      app.bucket.spare(app.queue.length + 2) * 1000, // ours and one spare
    );
    if (wait > 0) {
      room.readTimer = setTimeout(() => {
        room.readTimer = null;
        if (app.rooms.get(room.name) === room) flushRead(room);
      }, Math.max(wait, 50));
      return;
    }
    room.readSent = room.readUpTo;
    room.readAt = now;
    request("read", "read", room.name, { id: room.readUpTo });
  }

  // Our marker, moved by this page or another device of ours: the highest is kept.
  function onRead(frame) {
    const room = app.rooms.get(frame.room);
    if (!room || !Number.isInteger(frame.id) || frame.id < 1) return;
    room.read = Math.max(room.read, frame.id);
    if (room.read >= Math.max(room.newest, room.counted)) {
      setUnread(room, 0);
      return;
    }
    // Everything past the marker is shown (no gap below the newest): count it.
    if (room.unread && (room.start || (room.oldest !== null && room.read >= room.oldest - 1))) {
      let left = 0;
      for (const li of room.log.querySelectorAll("li.msg[data-id]:not(.mine):not(.deleted)")) {
        if (Number(li.dataset.id) > room.read) left += 1;
      }
      setUnread(room, Math.min(room.unread, left));
    }
  }

  // --- typing --------------------------------------------------------------------

  // Someone else typing in the open room, as one line.
  function showTyping() {
    const room = app.rooms.get(app.current);
    const names = room ? [...room.typers.keys()] : [];
    let text = "";
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = "several people are typing…";
    if (ui.typing.textContent === text) return; // unchanged: nothing to announce
    const stick = nearBottom();
    ui.typing.textContent = text;
    if (stick) scrollToBottom();
  }

  function onTyping(frame) {
    const room = app.rooms.get(frame.room);
    const user = frame.user;
    if (!room || typeof user !== "string" || !NAME.test(user) || user === app.user) return;
    const known = room.typers.has(user);
    clearTimeout(room.typers.get(user));
    room.typers.set(user, setTimeout(() => stopTyping(room, user), TYPING_SHOWN));
    if (!known && room.name === app.current) showTyping();
  }

  function stopTyping(room, user) {
    if (!room.typers.has(user)) return;
    clearTimeout(room.typers.get(user));
    room.typers.delete(user);
    if (room.name === app.current) showTyping();
  }

  // From the composer's input events: best effort, so only within spare pacing.
  function sendTyping() {
    const room = app.rooms.get(app.current);
    if (!room || !app.online || room.phase !== "live" || !ui.message.value.trim()) return;
    const now = performance.now();
    if (now - room.typingAt < TYPING_EVERY) return;
    if (app.bucket.spare(app.queue.length + 2) > 0) return; // the next keystroke tries again
    room.typingAt = now;
    app.queue.push(JSON.stringify({ type: "typing", ref: TYPING_REF, room: room.name }));
    pump();
  }

  // --- presence ------------------------------------------------------------------

  // A list (joined's, a burst's, an answer): replaces what was known. Null: unknown.
  function setOnline(room, names, count) {
    if (Array.isArray(names) && Number.isInteger(count) && count >= 0) {
      room.online = new Set(names.filter((n) => typeof n === "string" && NAME.test(n)));
      room.onlineCount = Math.max(count, room.online.size);
      room.presenceWait = PRESENCE_RETRY;
      clearTimeout(room.presenceTimer);
      room.presenceTimer = null;
    } else {
      room.online = null;
      room.onlineCount = null;
    }
    presenceChanged(room);
  }

  function forgetOnline(room) {
    room.watching = false;
    room.presenceAsking = false;
    clearTimeout(room.presenceTimer);
    room.presenceTimer = null;
    setOnline(room, null, null);
  }

  function onPresence(frame, answer) {
    const room = app.rooms.get(frame.room);
    if (!room || !room.watching) return; // not (yet) joined with presence on this connection
    if (Array.isArray(frame.online) || frame.online === null) {
      if (answer) room.presenceAsking = false;
      setOnline(room, frame.online, frame.online_count);
      askPresence(room); // still unknown: later
      return;
    }
    const user = frame.user;
    if (typeof frame.online !== "boolean" || typeof user !== "string" || !NAME.test(user)) return;
    const names = room.online;
    if (names === null) return; // nothing known to adjust: the next list says
    if (frame.online) {
      if (names.has(user)) return;
      names.add(user);
      room.onlineCount += 1;
    } else if (names.has(user)) {
      names.delete(user);
      room.onlineCount = Math.max(names.size, room.onlineCount - 1);
    } else if (room.onlineCount > names.size) {
      room.onlineCount -= 1; // one of those the partial list left out
    } else {
      return; // never counted: nothing changes
    }
    presenceChanged(room);
  }

  // Events may come by the dozen a second: the open room is redrawn once a frame
  // (and not at all in a hidden tab until it is shown again).
  function presenceChanged(room) {
    if (room.name !== app.current || app.presenceFrame !== null) return;
    app.presenceFrame = requestAnimationFrame(() => {
      app.presenceFrame = null;
      showPresence();
    });
  }

  function showPresence() {
    const room = app.rooms.get(app.current);
    if (!room || room.online === null) {
      setExpanded(false);
      ui.presence.hidden = true;
      return;
    }
    ui.presence.hidden = false;
    ui.onlineCount.textContent = `${room.onlineCount} online`;
    if (!ui.onlinePanel.hidden) renderOnline(room);
  }

  function renderOnline(room) {
    const names = [...room.online].sort(); // code point order, as the server sorts
    const shown = names.slice(0, ONLINE_SHOWN);
    const items = shown.map((name) => {
      const li = document.createElement("li");
      li.textContent = name;
      if (name === app.user) li.className = "you";
      return li;
    });
    const more = room.onlineCount - shown.length;
    if (more > 0) {
      const li = document.createElement("li");
      li.className = "more";
      li.textContent = shown.length ? `and ${more} more` : `${more} online, names not listed`;
      items.push(li);
    }
    ui.onlineList.setAttribute("aria-label", `Online in #${room.name}`);
    ui.onlineList.replaceChildren(...items);
  }

  function setExpanded(open) {
    const room = app.rooms.get(app.current);
    if (open && (!room || room.online === null)) return;
    if (!open && ui.onlinePanel.hidden) return;
    const focused = ui.onlinePanel.contains(document.activeElement);
    ui.onlinePanel.hidden = !open;
    ui.presenceToggle.setAttribute("aria-expanded", String(open));
    if (open) renderOnline(room);
    else if (focused) ui.presenceToggle.focus();
  }

  // Unknown (the state was unavailable): the open room asks again, backing off;
  // rooms in the background wait until they are opened.
  function askPresence(room) {
    if (room.presenceTimer !== null || room.presenceAsking || !room.watching) return;
    if (room.online !== null || room.name !== app.current || !app.online) return;
    room.presenceTimer = setTimeout(() => {
      room.presenceTimer = null;
      if (app.rooms.get(room.name) !== room || !room.watching || room.online !== null) return;
      if (room.name !== app.current || !app.online) return;
      room.presenceAsking = true;
      request("presence", "presence", room.name);
    }, room.presenceWait);
  }

  function updateOlder() {
    const room = app.rooms.get(app.current);
    ui.older.disabled = !room || room.phase !== "live" || room.start || room.loadingOlder;
    ui.older.textContent = room && room.start ? `Start of #${room.name}` : "Load older messages";
  }

  function joinRoom(name) {
    if (!NAME.test(name)) {
      showError("bad_request", "room must be 1-64 characters of A-Z a-z 0-9 _ . : -");
      return;
    }
    if (!app.rooms.has(name)) {
      const room = addRoom(name);
      saveRooms();
      if (app.online) {
        setPhase(room, "joining");
        request("join", "join", name, { presence: true });
      }
    }
    selectRoom(name);
  }

  function leaveRoom(name) {
    if (app.online) request("leave", "leave", name);
    removeRoom(name);
  }

  // --- messages --------------------------------------------------------------

  function timeText(ts) {
    if (!ts) return "";
    return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function button(className, text, label, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = className;
    b.textContent = text;
    if (label) b.setAttribute("aria-label", label);
    b.addEventListener("click", onClick);
    return b;
  }

  function render(room, user, body, ts) {
    const li = document.createElement("li");
    li.className = "msg";
    li.dataset.room = room;
    if (user === app.user) li.classList.add("mine");
    const head = document.createElement("div");
    head.className = "head";
    const who = document.createElement("span");
    who.className = "user";
    who.textContent = user;
    const when = document.createElement("time");
    head.append(who, when);
    const text = document.createElement("div");
    text.className = "body";
    text.textContent = body; // never innerHTML: bodies are other people's text
    li.append(head, text);
    stamp(li, null, ts);
    return li;
  }

  function stamp(li, id, ts) {
    if (id !== null) li.dataset.id = String(id);
    const when = li.querySelector("time");
    if (ts) {
      when.dateTime = new Date(ts).toISOString();
      when.title = new Date(ts).toLocaleString();
      when.textContent = timeText(ts);
    }
  }

  // Keep each log in id order; our pending messages (no id yet) stay at the end.
  function place(room, li, id) {
    let before = null;
    for (let node = room.log.lastElementChild; node; node = node.previousElementSibling) {
      const other = node.dataset.id === undefined ? Infinity : Number(node.dataset.id);
      if (other < id) break;
      before = node;
    }
    room.log.insertBefore(li, before);
  }

  function shownMessage(room, id) {
    return room.log.querySelector(`li.msg[data-id="${Number(id)}"]`);
  }

  function markEdited(li, body, ts) {
    if (li.classList.contains("deleted")) return; // final
    li.classList.add("edited");
    li.querySelector(".body").textContent = body;
    let flag = li.querySelector(".flag");
    if (!flag) {
      flag = document.createElement("span");
      flag.className = "flag";
      flag.textContent = "(edited)";
      li.querySelector("time").after(flag);
    }
    flag.title = `edited ${new Date(ts).toLocaleString()}`;
  }

  function markDeleted(li) {
    if (li.classList.contains("deleted")) return;
    const focused = li.contains(document.activeElement);
    li.classList.add("deleted");
    li.classList.remove("edited", "changing");
    for (const node of li.querySelectorAll(".flag, .actions, .editor, .draft")) node.remove();
    const text = li.querySelector(".body");
    text.textContent = "message deleted";
    text.hidden = false;
    // Our edits or deletes of it still waiting to be sent have nothing to change.
    const id = Number(li.dataset.id);
    app.outbox = app.outbox.filter(
      (item) =>
        item.kind === "send" ||
        item.room !== li.dataset.room ||
        item.target !== id ||
        item.state === "sent",
    );
    if (focused) ui.messages.focus({ preventScroll: true }); // its buttons are gone
  }

  // The state a history page folds into a message (also on live gap fills).
  function fold(li, m) {
    if (m.deleted) markDeleted(li);
    else if (typeof m.edited === "number") markEdited(li, m.body, m.edited);
  }

  // Edit and Delete on our own stored messages: always there, a phone has no hover.
  function addActions(li) {
    if (!li.classList.contains("mine") || li.dataset.id === undefined) return;
    if (li.classList.contains("deleted") || li.querySelector(".actions")) return;
    const box = document.createElement("span");
    box.className = "actions";
    box.append(
      button("edit", "Edit", "Edit this message", () => startEdit(li)),
      button("delete", "Delete", "Delete this message", () => askDelete(li)),
    );
    li.querySelector(".head").append(box);
  }

  // A message now shown with its id, its state as of `rev`: a change that came
  // before it applies now (if newer).
  function adopt(room, li, id, rev) {
    li.dataset.rev = String(rev);
    const late = room.orphans.get(id);
    if (late) {
      room.orphans.delete(id);
      applyChange(room, li, late);
    }
    addActions(li);
  }

  function applyChange(room, li, m) {
    if (typeof m.deletes === "number") {
      markDeleted(li); // final, whenever it comes
      app.outbox = app.outbox.filter(
        (item) => !(item.kind === "delete" && item.room === room.name && item.target === m.deletes),
      );
    } else {
      if (m.id > Number(li.dataset.rev)) {
        li.dataset.rev = String(m.id);
        markEdited(li, m.body, m.ts);
      }
      if (m.cid && m.user === app.user) {
        app.outbox = app.outbox.filter(
          (item) => !(item.kind === "edit" && item.room === room.name && item.cid === m.cid),
        );
      }
    }
    refresh(li);
  }

  // An edit or delete event: never a line of its own. Its target not shown (yet),
  // it is kept: a scroll-back page read before the change may bring the target.
  function onEvent(room, m) {
    const target = typeof m.edits === "number" ? m.edits : m.deletes;
    const li = shownMessage(room, target);
    if (li) {
      applyChange(room, li, m);
      return;
    }
    const kept = room.orphans.get(target);
    if (!kept || kept.id < m.id) room.orphans.set(target, m);
  }

  function nearBottom() {
    const box = ui.messages;
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  function scrollToBottom() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // `past`: a backlog or older page, not news: no unread count, no scrolling.
  // `rev`: the newest id the message's state includes (a page's last id).
  function show(room, m, { past = false, rev = m.id } = {}) {
    const current = room.name === app.current;
    const stick = current && nearBottom();
    const li = render(m.room, m.user, m.body, m.ts);
    stamp(li, m.id, m.ts);
    if (typeof m.cid === "string") li.dataset.cid = m.cid;
    place(room, li, m.id);
    fold(li, m);
    adopt(room, li, m.id, Math.max(rev, m.id));
    if (past) return;
    if (stick) scrollToBottom();
    if (m.user !== app.user) {
      stopTyping(room, m.user); // said it
      // Up to `counted`, the server's count from `joined` has it already.
      if (m.id > room.counted && !reading(room)) setUnread(room, room.unread + 1);
    }
    noteRead(room);
  }

  // A message from the server (live, catch-up or history): shown once per (room, id).
  function deliver(room, m, opts = {}) {
    const past = Boolean(opts.past);
    // Live messages and catch-up pages have no gaps between them, so the cursor
    // follows them (events included); a backlog or older page may hold a message
    // whose live copy has not come yet, and must not move the cursor past a gap.
    if (!past && (room.cursor === null || m.id > room.cursor)) room.cursor = m.id;
    if (room.oldest === null || m.id < room.oldest) room.oldest = m.id;
    if (m.id > room.newest) room.newest = m.id;
    if (room.seen.has(m.id)) {
      if (!past) noteRead(room); // our own, acked before its live copy came
      return;
    }
    if (typeof m.edits === "number" || typeof m.deletes === "number") {
      room.seen.add(m.id);
      onEvent(room, m); // not a line, not unread
      return;
    }
    if (m.user === app.user && typeof m.cid === "string") {
      const item = app.outbox.find(
        (it) => it.kind === "send" && it.room === m.room && it.cid === m.cid,
      );
      if (item) {
        confirm(room, item, m.id, m.ts, m, opts.rev); // its ack was lost (or is behind)
        if (!past) noteRead(room);
        return;
      }
    }
    room.seen.add(m.id);
    show(room, m, opts);
  }

  function confirm(room, item, id, ts, m = null, rev = id) {
    forget(item);
    if (room.seen.has(id)) {
      item.el.remove();
      return;
    }
    room.seen.add(id);
    const li = item.el;
    li.classList.remove("pending", "unconfirmed", "failed");
    delete li.dataset.local;
    delete li.dataset.code;
    li.querySelector(".note")?.remove();
    stamp(li, id, ts);
    place(room, li, id);
    if (m) fold(li, m);
    adopt(room, li, id, Math.max(rev, id));
  }

  // --- our own messages and changes ---------------------------------------------

  function forget(item) {
    const i = app.outbox.indexOf(item);
    if (i >= 0) app.outbox.splice(i, 1);
  }

  function say(body, roomName = app.current) {
    const room = app.rooms.get(roomName);
    if (!room) {
      showError("not_member", "join a room first");
      return;
    }
    const item = {
      kind: "send",
      local: ++app.locals,
      room: roomName,
      body,
      cid: newCid(),
      state: "queued",
      ref: null,
      tries: 0,
    };
    item.el = render(roomName, app.user, body, 0);
    item.el.classList.add("pending");
    item.el.dataset.local = String(item.local);
    item.el.dataset.cid = item.cid;
    item.el.querySelector("time").textContent = "sending…";
    room.log.append(item.el);
    scrollToBottom();
    app.outbox.push(item);
    if (room.phase === "live") sendItem(item);
  }

  // Edits and deletes wait in the outbox as sends do, and are sent again after a
  // drop (an edit with its cid, so it is never applied twice).
  function change(li, kind, body = null) {
    const room = app.rooms.get(li.dataset.room);
    if (!room || li.classList.contains("deleted")) return;
    const item = {
      kind,
      room: room.name,
      target: Number(li.dataset.id),
      body,
      cid: kind === "edit" ? newCid() : null,
      state: "queued",
      ref: null,
      tries: 0,
      el: li,
    };
    app.outbox.push(item);
    refresh(li);
    if (room.phase === "live") sendItem(item);
  }

  // A message with changes of ours on the way: dimmed, the newest edit shown as a draft.
  function refresh(li) {
    const id = Number(li.dataset.id);
    const mine = app.outbox.filter(
      (item) => item.kind !== "send" && item.room === li.dataset.room && item.target === id,
    );
    const edits = mine.filter((item) => item.kind === "edit");
    const gone = li.classList.contains("deleted");
    let draft = li.querySelector(".draft");
    if (edits.length && !gone) {
      if (!draft) {
        draft = document.createElement("div");
        draft.className = "draft";
        li.querySelector(".body").after(draft);
      }
      draft.textContent = edits[edits.length - 1].body;
    } else if (draft) {
      draft.remove();
      draft = null;
    }
    const editor = li.querySelector(".editor");
    li.querySelector(".body").hidden = Boolean(draft || editor);
    if (draft) draft.hidden = Boolean(editor);
    li.classList.toggle("changing", !gone && mine.length > 0);
  }

  // Inline: Enter saves, Shift+Enter is a new line, Escape cancels.
  function startEdit(li) {
    if (li.classList.contains("deleted")) return;
    const open = li.querySelector(".editor textarea");
    if (open) {
      open.focus();
      return;
    }
    const current = (li.querySelector(".draft") || li.querySelector(".body")).textContent;
    const form = document.createElement("form");
    form.className = "editor";
    const field = document.createElement("textarea");
    field.value = current;
    field.required = true;
    field.rows = Math.min(6, current.split("\n").length);
    field.setAttribute("aria-label", "Edit message");
    field.setAttribute("enterkeyhint", "done");
    const close = () => {
      form.remove();
      refresh(li);
      li.querySelector(".actions .edit")?.focus();
    };
    const save = document.createElement("button");
    save.type = "submit";
    save.className = "save";
    save.textContent = "Save";
    const buttons = document.createElement("div");
    buttons.className = "editor-buttons";
    buttons.append(save, button("cancel", "Cancel", null, close));
    form.append(field, buttons);
    field.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        close();
      } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        save.click(); // submits through the form's own checks
      }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const body = field.value;
      if (!body.trim()) return; // emptying a message is what Delete is for
      close();
      if (body !== current) change(li, "edit", body);
    });
    (li.querySelector(".draft") || li.querySelector(".body")).after(form);
    refresh(li);
    field.focus();
    field.setSelectionRange(field.value.length, field.value.length);
  }

  function askDelete(li) {
    if (li.classList.contains("deleted")) return;
    if (window.confirm("Delete this message for everyone?")) change(li, "delete");
  }

  function sendItem(item) {
    item.state = "sent";
    item.tries += 1;
    let fields;
    if (item.kind === "send") {
      item.el.classList.remove("unconfirmed");
      fields = { body: item.body, cid: item.cid };
    } else if (item.kind === "edit") {
      fields = { id: item.target, body: item.body, cid: item.cid };
    } else {
      fields = { id: item.target };
    }
    item.ref = request(item.kind, item.kind, item.room, fields);
  }

  // What an ack or error answers: by cid when it carries one, else by ref.
  function sentItem(ref, cid = null) {
    const found = app.outbox.find(
      (item) => item.state === "sent" && (cid ? item.cid === cid : item.ref === ref),
    );
    return found || null;
  }

  // A `duplicate` ack is the same confirmation: the id is the stored message's.
  function acked(room, item, frame) {
    if (item.kind === "send") {
      confirm(room, item, frame.id, frame.ts);
      return;
    }
    forget(item);
    // The event follows as a `message`; what it will change can be shown now.
    const event = { id: frame.id, ts: frame.ts, body: item.body };
    event[item.kind === "edit" ? "edits" : "deletes"] = item.target;
    applyChange(room, item.el, event);
  }

  function refused(item, code, message) {
    if (item.kind === "send") {
      item.state = "failed"; // kept, with its cid, for Retry
      failItem(item, code, message);
      showError(code, message);
      return;
    }
    forget(item);
    const li = item.el;
    refresh(li);
    // A delete of a message that is gone is done: asked again after a drop, or
    // deleted elsewhere meanwhile.
    if (item.kind === "delete" && code === "not_found") {
      const quiet = item.tries > 1 || li.classList.contains("deleted");
      markDeleted(li);
      if (quiet) return;
    }
    showError(code, `${item.kind} of message ${item.target}: ${message}`);
  }

  function failItem(item, code, message) {
    item.el.classList.remove("pending");
    item.el.classList.add("failed");
    item.el.dataset.code = code;
    item.el.querySelector("time").textContent = "not sent";
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = `${code}: ${message} `;
    note.append(button("retry", "Retry", null, () => retry(item)));
    const stick = nearBottom();
    item.el.append(note);
    if (stick) scrollToBottom();
  }

  // Same cid: if the failed send was stored after all, the server says so with
  // the stored id instead of storing a copy.
  function retry(item) {
    const room = app.rooms.get(item.room);
    if (!room || item.state !== "failed") return;
    item.el.querySelector(".note")?.remove();
    item.el.classList.remove("failed");
    item.el.classList.add("pending");
    delete item.el.dataset.code;
    item.el.querySelector("time").textContent = "sending…";
    item.state = "queued";
    room.log.append(item.el);
    scrollToBottom();
    if (room.phase === "live") sendItem(item);
  }

  // --- the connection ----------------------------------------------------------

  function wsUrl() {
    const url = new URL("ws", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.hash = "";
    url.search = new URLSearchParams(app.token ? { token: app.token } : { user: app.user });
    return url.href;
  }

  function connect() {
    app.timers.retry = null;
    setStatus("connecting", app.everOpened ? "Reconnecting…" : "Connecting…");
    const ws = new WebSocket(wsUrl(), ["chat.v1"]);
    app.ws = ws;
    ws.onopen = () => opened(ws);
    ws.onmessage = (event) => received(ws, event.data);
    ws.onclose = (event) => closed(ws, event.code, event.reason);
    ws.onerror = () => {}; // a close event follows with what there is to know
  }

  function opened(ws) {
    if (ws !== app.ws) return;
    app.online = true;
    app.everOpened = true;
    app.resumed = false;
    app.bucket = new Bucket();
    app.pending.clear();
    setStatus("online", `Connected as ${app.user}`);
    for (const room of app.rooms.values()) {
      setPhase(room, "joining");
      room.held = [];
      request("join", "join", room.name, { presence: true });
    }
    checkResumed();
    ping();
  }

  function closed(ws, code, reason) {
    if (ws !== app.ws) return;
    const wasOnline = app.online;
    app.ws = null;
    app.online = false;
    app.queue = [];
    app.pending.clear();
    for (const name of ["pump", "ping", "pong"]) {
      clearTimeout(app.timers[name]);
      app.timers[name] = null;
    }
    for (const room of app.rooms.values()) {
      setPhase(room, "offline");
      room.held = [];
      room.loadingOlder = false;
      clearTimeout(room.readTimer);
      room.readTimer = null;
      for (const user of [...room.typers.keys()]) stopTyping(room, user);
      forgetOnline(room); // stale from now on: shown again after the next joined
    }
    for (const item of app.outbox) {
      if (item.state === "sent") {
        item.state = "unconfirmed";
        item.ref = null;
        if (item.kind === "send") item.el.classList.add("unconfirmed");
      }
    }
    updateOlder();
    if (FATAL[code]) {
      app.stopped = true;
      setStatus("stopped", FATAL[code]);
      showError(`closed ${code}`, FATAL[code]);
      return;
    }
    const delay = app.backoff.next();
    const why = wasOnline ? `Connection lost (${code}${reason ? ` ${reason}` : ""})` : "Cannot connect";
    setStatus("offline", `${why}: reconnecting in ${delay.toFixed(1)} s`);
    app.timers.retry = setTimeout(connect, delay * 1000);
  }

  // A dead network delivers no close: stop waiting for one, and reconnect now.
  function drop(reason) {
    const ws = app.ws;
    if (!ws) return;
    try {
      ws.close(1000, reason);
    } catch {
      // already closing
    }
    closed(ws, 1006, reason);
  }

  function ping() {
    clearTimeout(app.timers.ping);
    app.timers.ping = setTimeout(() => {
      if (!app.online) return;
      request("ping", "ping", null);
      app.timers.pong = setTimeout(() => drop("no answer to ping"), PONG_WAIT);
    }, PING_EVERY);
  }

  function request(kind, purpose, room, fields = {}) {
    const ref = `w${++app.refs}`;
    app.pending.set(ref, { purpose, room });
    const frame = { type: kind, ref };
    if (room !== null) frame.room = room;
    for (const [key, value] of Object.entries(fields)) {
      if (value !== null && value !== undefined) frame[key] = value;
    }
    app.queue.push(JSON.stringify(frame));
    pump();
    return ref;
  }

  function pump() {
    if (app.timers.pump) return;
    while (app.queue.length && app.ws && app.ws.readyState === WebSocket.OPEN) {
      const wait = app.bucket.delay();
      if (wait > 0) {
        app.timers.pump = setTimeout(() => {
          app.timers.pump = null;
          pump();
        }, wait * 1000);
        return;
      }
      app.bucket.take();
      app.ws.send(app.queue.shift());
    }
  }

  // A connection counts as a success once every room is back and caught up:
  // one whose catch-up keeps failing keeps backing off.
  function checkResumed() {
    if (app.online && !app.resumed && [...app.rooms.values()].every((r) => r.phase === "live")) {
      app.resumed = true;
      app.backoff.reset();
    }
  }

  // --- frames from the server ------------------------------------------------------

  function received(ws, data) {
    if (ws !== app.ws) return;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object") return;
    const ref = typeof frame.ref === "string" ? frame.ref : null;
    const asked = ref && app.pending.get(ref);
    if (asked) app.pending.delete(ref);
    const { purpose, room: roomName } = asked || (ref === TYPING_REF ? { purpose: "typing" } : {});
    switch (frame.type) {
      case "message":
        onMessage(frame);
        break;
      case "joined":
        if (purpose === "join") onJoined(roomName, frame);
        break;
      case "read":
        onRead(frame);
        break;
      case "typing":
        onTyping(frame);
        break;
      case "presence":
        onPresence(frame, purpose === "presence");
        break;
      case "history":
        if (purpose) onHistory(purpose, roomName, frame);
        break;
      case "ack": {
        const item = sentItem(ref, typeof frame.cid === "string" ? frame.cid : null);
        const room = item && app.rooms.get(item.room);
        if (room) acked(room, item, frame);
        break;
      }
      case "pong":
        clearTimeout(app.timers.pong);
        app.timers.pong = null;
        ping();
        break;
      case "kicked":
        if (app.rooms.has(frame.room)) {
          removeRoom(frame.room);
          showError("kicked", `removed from ${frame.room} (${frame.reason})`);
        }
        break;
      case "error":
        onError(purpose, roomName, ref, frame);
        break;
      default:
        break; // `left`, and frame types this page does not know
    }
    checkResumed();
  }

  function onMessage(m) {
    const room = app.rooms.get(m.room);
    if (!room || typeof m.id !== "number") return;
    if (room.phase === "live") deliver(room, m);
    else if (room.phase !== "offline") room.held.push(m);
  }

  function onJoined(name, frame) {
    const room = app.rooms.get(name);
    if (!room) return; // left before the join was answered
    const last = typeof frame.last_id === "number" ? frame.last_id : null;
    if (Number.isInteger(frame.last_read)) room.read = Math.max(room.read, frame.last_read);
    room.readSent = 0; // what this connection has sent: nothing yet
    // A server without presence sends neither field: nothing shown, nothing asked.
    room.watching = "online_count" in frame;
    room.presenceAsking = false;
    setOnline(room, frame.online, frame.online_count);
    askPresence(room);
    if (Number.isInteger(frame.unread)) {
      // The server's count replaces ours: it holds everything up to last_id.
      room.counted = last || 0;
      setUnread(room, frame.unread);
    }
    if (room.cursor === null) {
      // First join: what is there already is the past (the backlog, and older
      // pages on request); only what comes after last_id must not be missed.
      room.cursor = last || 0;
      if (last) {
        setPhase(room, "backlog");
        request("history", "backlog", name, { limit: BACKLOG });
        return;
      }
      room.start = true;
    } else if (last !== null && last > room.cursor) {
      setPhase(room, "catchup");
      request("history", "catchup", name, { after: room.cursor, limit: PAGE });
      return;
    }
    goLive(room);
  }

  function onHistory(purpose, name, frame) {
    const room = app.rooms.get(name);
    if (!room) return;
    const messages = Array.isArray(frame.messages) ? frame.messages : [];
    // Its messages' state includes every change up to its last id.
    const rev = messages.reduce((most, m) => Math.max(most, m.id), 0);
    if (purpose === "older") {
      const box = ui.messages;
      const fromBottom = box.scrollHeight - box.scrollTop;
      for (const m of messages) deliver(room, m, { past: true, rev });
      if (room.name === app.current) box.scrollTop = box.scrollHeight - fromBottom; // stay put
      room.loadingOlder = false;
      if (!frame.more) room.start = true;
      updateOlder();
      return;
    }
    for (const m of messages) deliver(room, m, { past: purpose === "backlog", rev });
    if (purpose === "backlog" && !frame.more) room.start = true;
    if (purpose === "catchup" && frame.more && messages.length) {
      const after = messages[messages.length - 1].id;
      request("history", "catchup", name, { after, limit: PAGE });
      return;
    }
    goLive(room);
  }

  function goLive(room) {
    setPhase(room, "live");
    const held = room.held.sort((a, b) => a.id - b.id);
    room.held = [];
    for (const m of held) deliver(room, m);
    // Unconfirmed items not found in the catch-up go again with the same cid: one
    // stored after all is answered with its id (`duplicate`), not stored twice.
    for (const item of app.outbox) {
      if (item.room === room.name && (item.state === "unconfirmed" || item.state === "queued")) {
        sendItem(item);
      }
    }
    if (room.name === app.current) {
      updateOlder();
      scrollToBottom();
      noteRead(room);
    }
    flushRead(room); // read before a drop, not yet marked
  }

  function onError(purpose, name, ref, frame) {
    const code = String(frame.code);
    const message = String(frame.message);
    if (purpose === "typing") return; // best effort
    if (purpose === "presence") {
      // Housekeeping too: nothing shown, asked again later while it is unknown.
      const room = app.rooms.get(name);
      if (room) {
        room.presenceAsking = false;
        if (code === "unavailable" || code === "rate_limited") {
          room.presenceWait = Math.min(room.presenceWait * 2, PRESENCE_RETRY_MAX);
          askPresence(room);
        }
      }
      return;
    }
    if (purpose === "read") {
      // Housekeeping the user did not ask for: no error shown. A busy or failing
      // server gets the marker again later.
      const room = app.rooms.get(name);
      if (room && (code === "unavailable" || code === "rate_limited")) {
        room.readSent = 0;
        flushRead(room);
      }
      return;
    }
    if (purpose === "join" && app.rooms.has(name)) {
      showError(code, `join ${name}: ${message}`);
      if (code === "unavailable" || code === "rate_limited") drop(`join ${name}: ${code}`);
      else removeRoom(name); // refused for good: not rejoined
    } else if (purpose === "backlog" || purpose === "catchup") {
      showError(code, `history of ${name}: ${message}`);
      drop(`catch-up of ${name}: ${code}`); // reconnect later and try again
    } else if (purpose === "send" || purpose === "edit" || purpose === "delete") {
      const item = ref && sentItem(ref);
      if (item) refused(item, code, message);
      else showError(code, message);
    } else {
      if (purpose === "older") {
        const room = app.rooms.get(name);
        if (room) room.loadingOlder = false;
        updateOlder();
      }
      showError(code, message);
    }
  }

  // --- start -------------------------------------------------------------------------

  function tokenSubject(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const json = decodeURIComponent(
        [...atob(part)].map((c) => `%${c.charCodeAt(0).toString(16).padStart(2, "0")}`).join(""),
      );
      const sub = JSON.parse(json).sub;
      return typeof sub === "string" ? sub : null;
    } catch {
      return null;
    }
  }

  function start(user, token) {
    app.user = user;
    app.token = token;
    ui.login.hidden = true;
    ui.chat.hidden = false;
    for (const name of load(`chat.rooms.${user}`, [])) {
      if (NAME.test(name) && !app.rooms.has(name)) addRoom(name);
    }
    const first = app.rooms.keys().next();
    selectRoom(first.done ? null : first.value);
    connect();
    (app.current ? ui.message : ui.room).focus();
  }

  ui.loginForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = ui.name.value.trim();
    if (!NAME.test(name)) {
      showError("bad_request", "name must be 1-64 characters of A-Z a-z 0-9 _ . : -");
      return;
    }
    save("chat.name", name);
    start(name, null);
  });

  ui.joinForm.addEventListener("submit", (event) => {
    event.preventDefault();
    joinRoom(ui.room.value.trim());
    ui.room.value = "";
    ui.message.focus();
  });

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const body = ui.message.value;
    if (!body.trim()) return;
    say(body);
    ui.message.value = "";
  });

  ui.older.addEventListener("click", () => {
    const room = app.rooms.get(app.current);
    if (!room || room.phase !== "live" || room.start || room.loadingOlder) return;
    room.loadingOlder = true;
    updateOlder();
    request("history", "older", room.name, { before: room.oldest, limit: OLDER });
  });

  // A reader at the bottom stays there when the view shrinks (a phone's keyboard).
  let stuck = true;
  ui.messages.addEventListener("scroll", () => {
    stuck = nearBottom();
    const room = app.rooms.get(app.current);
    if (stuck && room) noteRead(room);
  });

  // Back to the tab: what is on screen now is read.
  document.addEventListener("visibilitychange", () => {
    const room = app.rooms.get(app.current);
    if (room) noteRead(room);
  });

  ui.message.addEventListener("input", sendTyping);

  ui.presenceToggle.addEventListener("click", () => setExpanded(ui.onlinePanel.hidden));
  ui.presence.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !ui.onlinePanel.hidden) {
      event.preventDefault();
      setExpanded(false);
      ui.presenceToggle.focus();
    }
  });
  // A tap or click elsewhere closes the list (on a phone it covers messages).
  document.addEventListener("click", (event) => {
    if (!ui.onlinePanel.hidden && !ui.presence.contains(event.target)) setExpanded(false);
  });
  window.addEventListener("resize", () => {
    if (stuck) scrollToBottom();
  });

  // Back online (a phone leaving a tunnel): don't wait out the backoff.
  window.addEventListener("online", () => {
    if (app.user && !app.ws && !app.stopped) {
      clearTimeout(app.timers.retry);
      app.backoff.reset();
      connect();
    }
  });

  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token");
  if (token) {
    const sub = tokenSubject(token);
    ui.loginForm.hidden = true;
    ui.tokenNote.hidden = false;
    ui.tokenNote.textContent = `Signed in with a token${sub ? ` as ${sub}` : ""}.`;
    start(sub || "", token);
  } else {
    ui.name.value = load("chat.name", "");
    ui.name.focus();
  }
})();
