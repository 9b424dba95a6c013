// chatroom page: one room's chat over a WebSocket (see PROTOCOL.md).
// Received text is only ever inserted with textContent / createTextNode, never as HTML.
// This file is an ES module: nothing leaks into the global scope.

const MAX_TEXT = 4000; // code points, as the server counts them
const COUNTER_FROM = 3500; // show the counter from here on
const MAX_NAME = 32;
const TYPING_EVERY_MS = 2000; // send our typing at most this often
const TYPING_SHOW_MS = 3000; // hide "bob is typing" after this long without a new one
const GROUP_MS = 5 * 60 * 1000; // consecutive messages closer than this are grouped
const BACKOFF_MIN_MS = 500;
const BACKOFF_FACTOR = 1.5;
const BACKOFF_MAX_MS = 15000;
const REFUSED_LIMIT = 5; // handshakes failed in a row while the HTTP server answers
// Closes after which the page stops retrying. Any other close of an opened connection is
// retried with backoff: 1001 (server shutdown), 1006 (dropped), 1012 (service restart: with
// --redis, Redis lost the room, and the next welcome brings a new epoch).
const FINAL_CLOSE = { 1002: 'a protocol error', 1003: 'unsupported data', 1007: 'invalid text',
  1008: 'the server dropped this connection (policy)', 1009: 'a message was too big' };
const ROOM_RE = /^[a-z0-9_-]{1,64}$/;
// A private room's name: 20 characters of a-z0-9, log2(36^20) ≈ 103 bits from crypto.getRandomValues.
const PRIVATE_ALPHABET = 'abcdefghijklmnopqrstuvwxyz0123456789';
const PRIVATE_LENGTH = 20;
const NOTIFY_BODY_MAX = 200; // characters of the message shown in a desktop notification
const RESERVED = new Set(['static', 'api', 'ws', 'healthz']);
const ERRORS = {
  rate_limited: 'You are sending too fast. Wait a moment and try again.',
  too_long: `That message is too long (${MAX_TEXT} characters at most).`,
  empty: 'That message is empty.',
  bad_name: 'The server refused that name.',
  bad_request: 'The server did not understand that request.',
  not_joined: 'Not joined yet. Wait for the connection.',
  unavailable: 'The chat service cannot be reached right now. Your message was not sent; it is back in the box.',
};

const $ = (id) => document.getElementById(id);
const el = {
  roomName: $('room-name'), copy: $('copy-link'), gotoForm: $('goto-form'), gotoInput: $('goto-input'),
  gotoError: $('goto-error'), me: $('me'), meName: $('me-name'), changeName: $('change-name'),
  status: $('status'), statusText: $('status-text'), statusExtra: $('status-extra'), retry: $('retry'),
  log: $('log'), logTop: $('log-top'), older: $('older'), olderNote: $('older-note'), logStart: $('log-start'),
  newMessages: $('new-messages'), typing: $('typing'),
  sendForm: $('send-form'), input: $('input'), sendError: $('send-error'), counter: $('counter'),
  nameForm: $('name-form'), nameTitle: $('name-title'), nameInput: $('name-input'), nameError: $('name-error'),
  nameCancel: $('name-cancel'), people: $('people'), peopleCount: $('people-count'), peopleList: $('people-list'),
  newRoom: $('new-room'), notify: $('notify'), notifyState: $('notify-state'),
  created: $('created'), createdLink: $('created-link'), createdCopy: $('created-copy'), createdClose: $('created-close'),
};

// ---- storage (may be unavailable: private modes, disabled cookies) ----
const store = {
  get(k) { try { return localStorage.getItem('chatroom.' + k); } catch { return null; } },
  set(k, v) { try { localStorage.setItem('chatroom.' + k, v); } catch { /* keep it in memory only */ } },
};
function randomId() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}
const session = store.get('session') || randomId();
store.set('session', session);

// ---- configuration from the server's meta tags ----
function meta(name) {
  const v = document.querySelector(`meta[name="chatroom-${name}"]`)?.content ?? '';
  return v.startsWith('{{') ? '' : v; // an unfilled placeholder (file opened directly)
}
const room = meta('room') || location.pathname.slice(1).toLowerCase() || 'general';
const wsBase = meta('ws-url').replace(/\/+$/, '');
const wsPort = meta('ws-port') || '5001';
const wsEndpoint = wsBase
  ? `${wsBase}/${room}`
  : `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.hostname}:${wsPort}/ws/${room}`;
const baseTitle = `#${room} · chatroom`;
document.title = baseTitle;
el.roomName.textContent = room;
el.input.placeholder = room.length <= 16 ? `Message #${room}` : 'Message'; // one line, also on a phone

// ---- state ----
let name = store.get('name') || ''; // what we ask for
let myName = ''; // what the server gave us (possibly "alice (2)")
let ws = null;
let joined = false;
let epoch = null; // the epoch our ids belong to
let lastId = null; // the last message id seen in that epoch
const seen = new Set();
let attempt = 0; // reconnect attempts since the last welcome
let refused = 0; // handshakes failed in a row
let retryTimer = 0;
let countdownTimer = 0;
const outbox = []; // says not yet echoed, oldest first: { cid, text, failed, reason, row }
let reconnectNow = false; // set when we closed the socket ourselves to reconnect at once
let lastTypingSent = 0;
const typers = new Map(); // name -> timeout id
let users = [];
let unread = 0; // messages that arrived while the tab was hidden
let unreadMention = false; // one of them mentions us
const known = new Set(); // display names seen here (online, or as authors), for mentions
let knownByLength = []; // the same, longest first; rebuilt when a name is added
let pendingNew = 0; // messages that arrived while scrolled up
let last = null; // { name, ts } of the last message shown, for grouping
let oldestId = null; // the oldest message id shown, for asking for the page before it
let olderOut = false; // a history request is out (on this connection)
let atStart = false; // the server said there is nothing older: the start of the room

// ---- connection ----
function setStatus(state, text, extra = '') {
  el.status.dataset.state = state;
  // Only touch what changed, so screen readers are not told the same status again.
  if (el.statusText.textContent !== text) el.statusText.textContent = text;
  if (el.statusExtra.textContent !== extra) el.statusExtra.textContent = extra;
  el.retry.hidden = state !== 'stopped';
  el.sendForm.classList.toggle('offline', state !== 'connected');
}

function connect() {
  clearTimeout(retryTimer);
  clearInterval(countdownTimer);
  joined = false;
  setStatus(attempt ? 'reconnecting' : 'connecting', attempt ? 'Reconnecting…' : 'Connecting…');
  let sock;
  try {
    sock = new WebSocket(wsEndpoint);
  } catch (e) {
    stop(`Cannot connect to ${wsEndpoint}: ${e.message}`);
    return;
  }
  ws = sock;
  let opened = false;
  sock.onopen = () => {
    opened = true;
    refused = 0;
    const hello = { type: 'hello', name, session };
    if (epoch !== null && lastId !== null) Object.assign(hello, { since: lastId, epoch });
    sock.send(JSON.stringify(hello));
  };
  sock.onmessage = (ev) => {
    if (sock !== ws) return;
    let f;
    try { f = JSON.parse(ev.data); } catch { return; }
    handle(f);
  };
  sock.onclose = (ev) => {
    if (sock !== ws) return;
    ws = null;
    joined = false;
    clearTypers();
    if (olderOut) { olderOut = false; updateTop(); } // its answer is lost with the connection
    if (reconnectNow) { reconnectNow = false; attempt = 0; connect(); return; }
    if (FINAL_CLOSE[ev.code]) {
      stop(`Disconnected: ${FINAL_CLOSE[ev.code]}${ev.reason ? ` (${ev.reason})` : ''}.`);
      return;
    }
    if (opened) { scheduleRetry(); return; }
    // The handshake failed. The browser does not say why: ask the HTTP server whether it is up.
    // If it is, the WebSocket side refused us (bad room, origin, server full).
    fetch('/static/favicon.svg', { cache: 'no-store' })
      .then((r) => { if (r.ok) refused++; })
      .catch(() => { /* the whole server is down: keep trying */ })
      .finally(() => {
        if (sock !== ws && ws !== null) return;
        if (refused >= REFUSED_LIMIT) stop('The chat server keeps refusing the connection.');
        else scheduleRetry();
      });
  };
}

function scheduleRetry() {
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * BACKOFF_FACTOR ** attempt);
  const delay = base * (0.5 + Math.random() * 0.5); // jitter: spread a room's reconnects
  attempt++;
  const due = Date.now() + delay;
  const tick = () => {
    const s = Math.max(1, Math.ceil((due - Date.now()) / 1000));
    setStatus('reconnecting', 'Connection lost. Reconnecting', ` in ${s} s…`);
  };
  tick();
  countdownTimer = setInterval(tick, 250);
  retryTimer = setTimeout(connect, delay);
}

function stop(text) {
  clearTimeout(retryTimer);
  clearInterval(countdownTimer);
  setStatus('stopped', text);
}

function reconnect() {
  clearTimeout(retryTimer);
  clearInterval(countdownTimer);
  attempt = 0;
  refused = 0;
  if (ws && ws.readyState <= WebSocket.OPEN) {
    reconnectNow = true;
    ws.close(1000);
  } else {
    ws = null;
    connect();
  }
}

function send(frame) {
  if (!ws || ws.readyState !== WebSocket.OPEN || !joined) return false;
  ws.send(JSON.stringify(frame));
  return true;
}

function handle(f) {
  switch (f.type) {
    case 'welcome': {
      joined = true;
      attempt = 0;
      refused = 0;
      myName = f.name;
      el.meName.textContent = myName;
      el.me.hidden = false;
      if (f.epoch !== epoch) {
        // Another id sequence (a first connection, or the server lost or forgot the room):
        // what is shown, older pages included, is replaced by the new history. Unsent says stay.
        el.log.replaceChildren(el.logTop, ...outbox.map((o) => o.row));
        seen.clear();
        last = null;
        lastId = null;
        oldestId = null;
        atStart = false;
        epoch = f.epoch;
      }
      olderOut = false;
      const stick = atBottom();
      // Learn every name first, so a mention in the history of someone who speaks later in it
      // (or is online but silent) is highlighted too.
      learnNames([...(f.users || []), ...(f.history || []).map((m) => m.name)]);
      // A say of ours that the history holds has arrived (its echo was lost with the old
      // connection): addMessage takes it out of the outbox. The rest is sent again below.
      for (const m of f.history || []) addMessage(m);
      setUsers(f.users || []);
      setStatus('connected', 'Connected');
      for (const o of outbox) o.row.querySelector('.who').textContent = myName;
      sendOutbox();
      updateTop();
      if (stick) scrollToBottom();
      break;
    }
    case 'message':
      clearTyper(f.name);
      notify(addMessage(f), f.name !== myName, f);
      break;
    case 'history':
      addOlder(f);
      break;
    case 'joined':
      learnNames([f.name]);
      if (!users.includes(f.name)) setUsers([...users, f.name]);
      notify(addEvent([isolated(f.name), ' joined'], f.ts), false);
      break;
    case 'left':
      learnNames([f.name]);
      clearTyper(f.name);
      setUsers(users.filter((u) => u !== f.name));
      notify(addEvent([isolated(f.name), ' left'], f.ts), false);
      break;
    case 'typing':
      showTyper(f.name);
      break;
    case 'error':
      if (f.code === 'bad_name') {
        // Not joined: drop this connection without retrying and ask for another name.
        const s = ws;
        ws = null;
        joined = false;
        s?.close(1000);
        setStatus('idle', 'Not connected');
        askName(`${ERRORS.bad_name} ${f.message || ''}`.trim());
      } else if (olderOut && typeof f.text !== 'string' && f.code !== 'not_joined') {
        // The history request was refused (a say's refusal carries its text): ask again on the
        // next scroll to the top or click.
        olderOut = false;
        el.olderNote.textContent = f.code === 'rate_limited' ? 'Too fast: try again in a moment.'
          : f.code === 'unavailable' ? 'The chat service cannot be reached: try again in a moment.'
            : 'Could not load earlier messages.';
        updateTop();
      } else {
        showError(ERRORS[f.code] || f.message || f.code);
        // A refused message is not lost: its row says "not sent" and its text goes back in the
        // input box, above whatever is being typed there. The refusal can overtake the echo of
        // an earlier message, so it is matched by its text, not its place.
        if (typeof f.text === 'string') {
          const refused = failSay(f.text, f.code) ?? f.text;
          if (refused.trim()) {
            el.input.value = el.input.value ? `${refused}\n${el.input.value}` : refused;
            updateCounter();
          }
        }
      }
      break;
    default:
      break;
  }
}

// ---- rendering ----
function atBottom() {
  const l = el.log;
  return l.scrollHeight - l.scrollTop - l.clientHeight < 40;
}
function scrollToBottom() {
  el.log.scrollTop = el.log.scrollHeight;
  pendingNew = 0;
  el.newMessages.hidden = true;
}
// Keep the view at the bottom if we were there; otherwise offer a button. In a hidden tab,
// count what arrives in the title, marked "•" once something mentions us, and tell the
// desktop about a mention when notifications are on.
function notify(added, fromOther, message = null) {
  if (!added) return;
  if (added.stick || added.own) scrollToBottom();
  else if (fromOther) {
    pendingNew++;
    el.newMessages.textContent = `${pendingNew} new message${pendingNew > 1 ? 's' : ''} ↓`;
    el.newMessages.hidden = false;
  }
  if (fromOther && document.hidden) {
    unread++;
    if (added.mentionsMe) {
      unreadMention = true;
      if (message) desktopNotify(message);
    }
    document.title = `(${unread}${unreadMention ? '•' : ''}) ${baseTitle}`;
  }
}

function timeEl(ts) {
  const d = new Date(ts);
  const t = document.createElement('time');
  t.dateTime = d.toISOString();
  t.textContent = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  t.title = d.toLocaleString();
  return t;
}

// Rows are inserted above the unsent says, which stay at the bottom.
function insertRow(row) {
  el.log.insertBefore(row, el.log.querySelector(':scope > .out'));
}
const rowInfo = new WeakMap(); // a message row -> { name, ts }, for grouping
const groups = (prev, m) => Boolean(prev) && prev.name === m.name && m.ts - prev.ts < GROUP_MS;
function setGrouped(row, grouped) {
  row.classList.toggle('cont', grouped);
  row.querySelector('.meta').classList.toggle('vh', grouped);
}

function addMessage(m) {
  settle(m);
  if (typeof m.id !== 'number' || seen.has(m.id)) return null;
  seen.add(m.id);
  if (lastId === null || m.id > lastId) lastId = m.id;
  if (oldestId === null) { oldestId = m.id; updateTop(); } // the first shown: older ones may exist
  else if (m.id < oldestId) oldestId = m.id;
  const stick = atBottom();
  const { row, own, mentionsMe } = messageRow(m, last);
  insertRow(row);
  last = { name: m.name, ts: m.ts };
  learnNames([m.name]);
  return { stick, own, mentionsMe };
}

// One message's row; grouped under `prev` ({ name, ts } of the message shown just above it).
function messageRow(m, prev) {
  const own = m.name === myName;
  const grouped = groups(prev, m);
  const row = document.createElement('div');
  row.className = 'msg' + (own ? ' own' : '') + (grouped ? ' cont' : '');
  row.dataset.id = m.id;
  const head = document.createElement('div');
  head.className = grouped ? 'meta vh' : 'meta';
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = m.name;
  head.append(who, ' ', timeEl(m.ts));
  const body = document.createElement('div');
  body.className = 'text';
  // A mention of us is marked in the text; the row too, unless we wrote it.
  const mentionsMe = appendRich(body, String(m.text)) && !own;
  if (mentionsMe) {
    row.classList.add('mentions-me');
    const note = document.createElement('span');
    note.className = 'vh';
    note.textContent = '(mentions you)';
    head.insertBefore(note, head.lastChild);
    head.insertBefore(document.createTextNode(' '), head.lastChild);
  }
  row.append(head, body);
  rowInfo.set(row, { name: m.name, ts: m.ts });
  return { row, own, mentionsMe };
}

// ---- older messages ----
// A "history" request for the page before the oldest message shown, sent on a scroll to the top
// of the log or with the "Load earlier messages" button; one at a time. The answer goes in
// above, and the log is scrolled by what that added above the first row shown, so what is
// being read stays where it is. `more: false` is the start of the room.
const OLDER_PAGE = 50;
const NEAR_TOP_PX = 60;
el.logStart.textContent = `This is the beginning of #${room}`;
function updateTop() {
  const any = oldestId !== null;
  el.older.hidden = !any || atStart;
  el.logStart.hidden = !any || !atStart;
  el.older.textContent = olderOut ? 'Loading earlier messages…' : 'Load earlier messages';
  if (!any || atStart || olderOut) el.olderNote.textContent = '';
}
function loadOlder() {
  if (olderOut || atStart || oldestId === null) return;
  if (!send({ type: 'history', before: oldestId, limit: OLDER_PAGE })) return;
  olderOut = true;
  updateTop();
}
function addOlder(f) {
  olderOut = false;
  const list = (Array.isArray(f.messages) ? f.messages : [])
    .filter((m) => typeof m.id === 'number' && !seen.has(m.id) && (oldestId === null || m.id < oldestId))
    .sort((a, b) => a.id - b.id);
  for (const m of f.messages || []) settle(m);
  learnNames(list.map((m) => m.name));
  // The reference: the first row below the top (its text, which stays put even when the row
  // joins the group of the message put above it and its name line folds away).
  const anchor = el.logTop.nextElementSibling;
  const ref = anchor?.querySelector('.text') || anchor;
  const before = ref?.getBoundingClientRect().top;
  const rows = document.createDocumentFragment();
  let prev = null;
  for (const m of list) {
    seen.add(m.id);
    if (oldestId === null || m.id < oldestId) oldestId = m.id;
    rows.append(messageRow(m, prev).row);
    prev = { name: m.name, ts: m.ts };
  }
  el.logTop.after(rows);
  if (prev && rowInfo.has(anchor)) setGrouped(anchor, groups(prev, rowInfo.get(anchor)));
  if (f.more === false) atStart = true;
  const hadFocus = document.activeElement === el.older;
  updateTop();
  if (ref) el.log.scrollTop += ref.getBoundingClientRect().top - before;
  if (hadFocus && el.older.hidden) el.log.focus({ preventScroll: true }); // the button is gone
}
el.older.addEventListener('click', loadOlder);

// ---- unsent says (the outbox) ----
// Every say carries a fresh cid. Until its echo (a message with that cid) comes back it is a
// "sending…" row at the bottom of the log, also while disconnected. After each welcome, those
// the welcome's history holds are done (addMessage settles them); the rest are sent again with
// the same cid, in order, and the server answers a cid it has seen with the original message
// (PROTOCOL.md, "Sent once"). A refused say (error with its text) is marked "not sent" and its
// text goes back in the box. The unsent are kept in this tab's sessionStorage too, so a
// reload sends them as well.
const OUTBOX_KEY = `chatroom.outbox.${room}`;
const SHORT_REASON = { rate_limited: 'too fast', too_long: 'too long', empty: 'empty', unavailable: 'service unavailable' };
function saveOutbox() {
  try {
    const keep = outbox.filter((o) => !o.failed).map(({ cid, text }) => ({ cid, text }));
    if (keep.length) sessionStorage.setItem(OUTBOX_KEY, JSON.stringify(keep));
    else sessionStorage.removeItem(OUTBOX_KEY);
  } catch { /* memory only */ }
}
function loadOutbox() {
  let saved = [];
  try { saved = JSON.parse(sessionStorage.getItem(OUTBOX_KEY) || '[]'); } catch { saved = []; }
  if (!Array.isArray(saved)) return;
  for (const o of saved) {
    if (typeof o?.cid === 'string' && o.cid.length <= 64 && typeof o.text === 'string' && o.text.trim()) queueSay(o.text, o.cid);
  }
}
function outRow(o) {
  const row = document.createElement('div');
  row.className = 'out own';
  row.dataset.cid = o.cid;
  row.dataset.state = 'sending';
  const head = document.createElement('div');
  head.className = 'meta';
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = myName || name;
  const state = document.createElement('span');
  state.className = 'out-state';
  state.textContent = 'sending…';
  head.append(who, ' ', state);
  const body = document.createElement('div');
  body.className = 'text';
  body.textContent = o.text.trim();
  row.append(head, body);
  return row;
}
function queueSay(text, cid = randomId()) {
  const o = { cid, text, failed: false, reason: '', row: null };
  o.row = outRow(o);
  outbox.push(o);
  el.log.append(o.row);
  return o;
}
function dropSay(o) {
  const at = outbox.indexOf(o);
  if (at >= 0) outbox.splice(at, 1);
  o.row.remove();
}
function sendOutbox() {
  for (const o of outbox) if (!o.failed) send({ type: 'say', text: o.text, cid: o.cid });
}
// A message carrying the cid of a say of ours: that say has arrived, its row goes.
function settle(m) {
  if (typeof m.cid !== 'string') return;
  const o = outbox.find((x) => x.cid === m.cid);
  if (!o) return;
  dropSay(o);
  // Marked refused by its text, but it arrived: the refusal was of another say with that text.
  if (o.failed) {
    const other = outbox.find((x) => !x.failed && x.text.trim() === o.text.trim());
    if (other) markFailed(other, o.reason);
  }
  saveOutbox();
}
function markFailed(o, reason) {
  o.failed = true;
  o.reason = reason;
  o.row.dataset.state = 'failed';
  o.row.querySelector('.out-state').textContent = `not sent (${SHORT_REASON[reason] || reason})`;
  const dismiss = document.createElement('button');
  dismiss.type = 'button';
  dismiss.className = 'btn btn-link';
  dismiss.textContent = 'Dismiss';
  dismiss.addEventListener('click', () => { dropSay(o); el.input.focus(); });
  o.row.querySelector('.meta').append(dismiss);
}
// The server refused a say whose trimmed text is `text`: its row says so. Returns what was typed.
function failSay(text, code) {
  const o = outbox.find((x) => !x.failed && x.text.trim() === text);
  if (!o) return null;
  markFailed(o, code);
  saveOutbox();
  return o.text;
}

// A name (or any text from others) in its own bidi isolate, so that right-to-left text or a
// direction override inside it cannot reorder what stands around it.
function isolated(text) {
  const b = document.createElement('bdi');
  b.textContent = text;
  return b;
}

function addEvent(parts, ts) {
  const stick = atBottom();
  const row = document.createElement('div');
  row.className = 'event';
  row.append(...parts, ' · ', timeEl(ts || Date.now()));
  insertRow(row);
  last = null;
  return { stick, own: false };
}

// ---- mentions ----
// A mention is "@" followed by the display name of someone known here (online now, or the
// author of a message or a joined/left line seen on this page), compared without case. The
// "@" must not follow a letter, digit or "_" (so bob@example.org is no mention), and the
// name must not be followed by one (so "@al" is not a mention of "al" inside "@alice").
// Names may hold spaces ("alice (2)", "Mary Ann"): of the names that fit, the longest wins.
const WORD_CHAR = /[\p{L}\p{N}\p{M}_]/u;
function learnNames(names) {
  let added = false;
  for (const n of names) {
    if (typeof n === 'string' && n && !known.has(n)) { known.add(n); added = true; }
  }
  if (added) knownByLength = [...known].sort((a, b) => b.length - a.length);
}
const fold = (s) => s.toLowerCase();
/** The mentions in `text`: { start, end, name } (UTF-16 offsets; `start` is at the "@"). */
function findMentions(text) {
  const found = [];
  for (let at = text.indexOf('@'); at >= 0; at = text.indexOf('@', at + 1)) {
    if (at > 0 && WORD_CHAR.test(text[at - 1])) continue;
    for (const n of knownByLength) {
      const end = at + 1 + n.length;
      if (end > text.length || fold(text.slice(at + 1, end)) !== fold(n)) continue;
      if (end < text.length && WORD_CHAR.test(text[end])) continue;
      found.push({ start: at, end, name: n });
      at = end - 1;
      break;
    }
  }
  return found;
}
const isMe = (n) => myName !== '' && fold(n) === fold(myName);

// A message's text as DOM nodes: http(s) URLs become links, mentions become <span
// class="mention"> (a <mark class="mention mention-me"> when they name us), the rest stays text.
// Returns whether a mention names us.
function appendRich(parent, text) {
  const links = findLinks(text);
  const mentions = findMentions(text)
    .filter((m) => !links.some((l) => m.start < l.end && l.start < m.end)); // a link wins
  const parts = [...links, ...mentions].sort((a, b) => a.start - b.start);
  let at = 0;
  let mentionsMe = false;
  for (const p of parts) {
    parent.append(document.createTextNode(text.slice(at, p.start)));
    if (p.href) {
      const a = document.createElement('a');
      a.href = p.href;
      a.textContent = text.slice(p.start, p.end);
      a.target = '_blank';
      a.rel = 'noopener noreferrer';
      parent.append(a);
    } else {
      const me = isMe(p.name);
      mentionsMe ||= me;
      const span = document.createElement(me ? 'mark' : 'span');
      span.className = me ? 'mention mention-me' : 'mention';
      span.dataset.name = p.name;
      span.textContent = text.slice(p.start, p.end);
      parent.append(span);
    }
    at = p.end;
  }
  parent.append(document.createTextNode(text.slice(at)));
  return mentionsMe;
}

// http(s) URLs, as { start, end, href }.
const URL_RE = /\bhttps?:\/\/[^\s<>"']+/gi;
function findLinks(text) {
  const found = [];
  for (const match of text.matchAll(URL_RE)) {
    let url = match[0];
    // Leave trailing punctuation (and an unbalanced closing bracket) outside the link.
    for (;;) {
      const c = url.at(-1);
      if ('.,;:!?\'"'.includes(c)) url = url.slice(0, -1);
      else if (c === ')' && !url.includes('(')) url = url.slice(0, -1);
      else if (c === ']' && !url.includes('[')) url = url.slice(0, -1);
      else break;
    }
    let href;
    try { href = new URL(url); } catch { continue; }
    if (href.protocol !== 'http:' && href.protocol !== 'https:') continue;
    found.push({ start: match.index, end: match.index + url.length, href: href.href });
  }
  return found;
}

function setUsers(list) {
  users = [...new Set(list)].sort((a, b) => a.localeCompare(b));
  learnNames(users);
  el.peopleCount.textContent = String(users.length);
  el.peopleList.replaceChildren(...users.map((u) => {
    const li = document.createElement('li');
    li.append(isolated(u));
    if (u === myName) {
      li.className = 'self';
      const you = document.createElement('span');
      you.className = 'you';
      you.textContent = ' (you)';
      li.append(you);
    }
    return li;
  }));
}

function showTyper(who) {
  clearTimeout(typers.get(who));
  typers.set(who, setTimeout(() => clearTyper(who), TYPING_SHOW_MS));
  renderTypers();
}
function clearTyper(who) {
  if (!typers.has(who)) return;
  clearTimeout(typers.get(who));
  typers.delete(who);
  renderTypers();
}
function clearTypers() {
  for (const t of typers.values()) clearTimeout(t);
  typers.clear();
  renderTypers();
}
function renderTypers() {
  const n = [...typers.keys()];
  el.typing.replaceChildren(...(n.length === 0 ? []
    : n.length === 1 ? [isolated(n[0]), ' is typing…']
      : n.length === 2 ? [isolated(n[0]), ' and ', isolated(n[1]), ' are typing…']
        : [`${n.length} people are typing…`]));
}

let errorTimer = 0;
function showError(text) {
  clearTimeout(errorTimer);
  el.sendError.textContent = text;
  errorTimer = setTimeout(() => { el.sendError.textContent = ''; }, 6000);
}

// ---- composing ----
const length = (s) => [...s].length;
function updateCounter() {
  const n = length(el.input.value);
  el.counter.textContent = n >= COUNTER_FROM ? `${n} / ${MAX_TEXT}` : '';
  el.counter.classList.toggle('over', n > MAX_TEXT);
  // Grow the textarea with its content, up to the CSS max-height.
  el.input.style.height = 'auto';
  el.input.style.height = `${el.input.scrollHeight + 2}px`;
}

function submitMessage() {
  const text = el.input.value;
  if (!text.trim()) return;
  if (length(text.trim()) > MAX_TEXT) { showError(ERRORS.too_long); return; }
  // Sent now if connected, else after the next welcome: either way it shows as "sending…".
  for (const o of outbox.filter((x) => x.failed)) dropSay(o); // dealt with: the text was given back
  const o = queueSay(text);
  saveOutbox();
  send({ type: 'say', text, cid: o.cid });
  el.input.value = '';
  lastTypingSent = 0; // the next message's typing is news again
  updateCounter();
  el.sendError.textContent = '';
  scrollToBottom();
}

el.input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submitMessage();
  }
});
el.input.addEventListener('input', () => {
  updateCounter();
  const now = Date.now();
  if (el.input.value.trim() && now - lastTypingSent >= TYPING_EVERY_MS && send({ type: 'typing' })) {
    lastTypingSent = now;
  }
});
el.sendForm.addEventListener('submit', (e) => { e.preventDefault(); submitMessage(); });

// ---- name ----
function askName(error = '') {
  el.nameInput.value = name;
  el.nameTitle.textContent = name ? 'Change your name' : 'Pick a name to join';
  el.nameError.textContent = error;
  el.nameCancel.hidden = !name || Boolean(error);
  el.nameForm.hidden = false;
  el.sendForm.hidden = true;
  el.nameInput.focus();
}
function nameProblem(n) {
  if (!n) return 'Please enter a name.';
  if (length(n) > MAX_NAME) return `A name has at most ${MAX_NAME} characters.`;
  if (/\p{Cc}/u.test(n)) return 'A name cannot contain control characters.';
  return '';
}
el.nameForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const n = el.nameInput.value.trim();
  const problem = nameProblem(n);
  if (problem) { el.nameError.textContent = problem; el.nameInput.focus(); return; }
  const changed = n !== name || !joined;
  name = n;
  store.set('name', n);
  el.meName.textContent = n;
  el.me.hidden = false;
  el.nameForm.hidden = true;
  el.sendForm.hidden = false;
  el.input.focus();
  if (changed) reconnect();
});
el.nameCancel.addEventListener('click', () => {
  el.nameForm.hidden = true;
  el.sendForm.hidden = false;
  el.input.focus();
});
el.changeName.addEventListener('click', () => askName());
el.retry.addEventListener('click', reconnect);

// ---- header: copy link, new private room, go to room ----
const roomUrl = `${location.origin}/${room}`;
async function copyLink(button) {
  const url = roomUrl;
  let ok = false;
  try {
    await navigator.clipboard.writeText(url);
    ok = true;
  } catch {
    // Fallback for insecure origins and older browsers.
    const ta = document.createElement('textarea');
    ta.value = url;
    ta.className = 'offscreen';
    document.body.append(ta);
    ta.select();
    try { ok = document.execCommand('copy'); } catch { ok = false; }
    ta.remove();
  }
  button.textContent = ok ? 'Copied!' : 'Copy failed';
  if (!ok) showError(`Copy this link by hand: ${url}`);
  setTimeout(() => { button.textContent = 'Copy link'; }, 2000);
}
el.copy.addEventListener('click', () => copyLink(el.copy));

// A name nobody can guess: PRIVATE_LENGTH characters drawn uniformly from PRIVATE_ALPHABET.
// A byte is used only below the largest multiple of the alphabet's size (252 = 7 × 36), so
// `byte % 36` has no modulo bias; the rest are drawn again.
function privateRoomName() {
  const n = PRIVATE_ALPHABET.length;
  const limit = 256 - (256 % n);
  let out = '';
  const bytes = new Uint8Array(PRIVATE_LENGTH * 2);
  while (out.length < PRIVATE_LENGTH) {
    crypto.getRandomValues(bytes);
    for (const b of bytes) {
      if (b < limit && out.length < PRIVATE_LENGTH) out += PRIVATE_ALPHABET[b % n];
    }
  }
  return out;
}
// The new room's page shows the "Private room created" notice: the flag goes in this tab's
// sessionStorage (never in the URL, which is what gets shared).
const CREATED_KEY = 'chatroom.created';
el.newRoom.addEventListener('click', () => {
  const r = privateRoomName();
  try { sessionStorage.setItem(CREATED_KEY, r); } catch { /* no notice then; the room works */ }
  location.assign(`/${r}`);
});
let justCreated = false;
try {
  justCreated = sessionStorage.getItem(CREATED_KEY) === room;
  sessionStorage.removeItem(CREATED_KEY);
} catch { /* storage unavailable */ }
if (justCreated) {
  el.createdLink.textContent = roomUrl;
  el.created.hidden = false;
}
el.createdCopy.addEventListener('click', () => copyLink(el.createdCopy));
el.createdClose.addEventListener('click', () => {
  el.created.hidden = true;
  (el.sendForm.hidden ? el.nameInput : el.input).focus();
});

function roomProblem(r) {
  if (!r) return 'Type a room name.';
  if (!ROOM_RE.test(r)) return 'Room names are 1–64 characters: a–z, 0–9, _ and -.';
  if (RESERVED.has(r)) return `“${r}” is reserved; pick another name.`;
  return '';
}
el.gotoForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const r = el.gotoInput.value.trim().replace(/^\/+/, '').toLowerCase();
  const problem = roomProblem(r);
  el.gotoError.textContent = problem;
  el.gotoError.hidden = !problem;
  el.gotoInput.setAttribute('aria-invalid', String(Boolean(problem)));
  if (!problem) location.assign(`/${r}`);
});
el.gotoInput.addEventListener('input', () => {
  el.gotoError.hidden = true;
  el.gotoInput.removeAttribute('aria-invalid');
});

// Back online: no need to wait for the next retry.
window.addEventListener('online', () => { if (!ws && el.status.dataset.state === 'reconnecting') reconnect(); });

// ---- scrolling, unread ----
el.log.addEventListener('scroll', () => {
  if (atBottom()) { pendingNew = 0; el.newMessages.hidden = true; }
  if (el.log.scrollTop < NEAR_TOP_PX) loadOlder();
});
el.newMessages.addEventListener('click', () => { scrollToBottom(); el.input.focus(); });
document.addEventListener('visibilitychange', () => {
  if (!document.hidden) { unread = 0; unreadMention = false; document.title = baseTitle; }
  showNotifyState();
});

// ---- desktop notifications ----
// Off until the person clicks "Notify me"; the permission is asked for only then, never on
// load. The choice is kept per browser (localStorage "chatroom.notify": "on" or "off").
const canNotify = typeof window.Notification === 'function';
function notifyState() {
  if (!canNotify) return 'unavailable';
  if (Notification.permission === 'denied') return 'blocked';
  return Notification.permission === 'granted' && store.get('notify') === 'on' ? 'on' : 'off';
}
function showNotifyState() {
  const state = notifyState();
  el.notify.hidden = state === 'unavailable';
  el.notify.dataset.state = state;
  if (state !== 'unavailable' && el.notifyState.textContent !== state) el.notifyState.textContent = state;
  el.notify.title = state === 'blocked' ? 'This browser blocks notifications from this site (see its site settings)'
    : state === 'on' ? 'Click to turn desktop notifications off' : 'Get a desktop notification when someone mentions you';
}
el.notify.addEventListener('click', async () => {
  const state = notifyState();
  if (state === 'on') {
    store.set('notify', 'off');
  } else if (state === 'blocked') {
    showError('This browser blocks notifications from this site: allow them in its site settings, then click again.');
  } else if (state === 'off') {
    let permission = Notification.permission;
    if (permission === 'default') {
      try { permission = await Notification.requestPermission(); } catch { permission = Notification.permission; }
    }
    if (permission === 'granted') store.set('notify', 'on');
  }
  showNotifyState();
});
showNotifyState();
// The permission can change in the browser's settings while the page is open.
navigator.permissions?.query({ name: 'notifications' })
  .then((p) => { p.addEventListener('change', showNotifyState); })
  .catch(() => { /* not supported: the state is read again on each visibility change */ });

function desktopNotify(m) {
  if (notifyState() !== 'on') return;
  let text = String(m.text).replace(/\s+/g, ' ').trim();
  if ([...text].length > NOTIFY_BODY_MAX) text = `${[...text].slice(0, NOTIFY_BODY_MAX - 1).join('')}…`;
  try {
    // The tag is the message's: two hidden tabs of this room show it once.
    const n = new Notification(`${m.name} mentioned you in #${room}`, { body: text, tag: `chatroom/${room}/${m.id}` });
    n.addEventListener('click', () => { window.focus(); n.close(); });
  } catch {
    /* some browsers allow notifications only from a service worker: the title still says it */
  }
}

// The people list is open on wide screens, folded away on phones.
const wide = matchMedia('(min-width: 760px)');
el.people.open = wide.matches;
wide.addEventListener('change', () => { el.people.open = wide.matches; });

// ---- start ----
loadOutbox();
if (name && !nameProblem(name)) {
  el.meName.textContent = name;
  el.me.hidden = false;
  el.sendForm.hidden = false;
  if (justCreated) el.createdCopy.focus(); // the next thing to do in a new private room
  connect();
} else {
  askName();
}
