#!/usr/bin/env node
// Benchmark peer for chatroom: the WebSocket contract of PROTOCOL.md on Node.js and `ws`.
//
// Written the way a competent Node author would: one process, one event loop, each broadcast
// serialized once and the same string sent to every member, slow consumers dropped by their
// buffered byte count. Owned by the benchmark suite (bench/); not part of the product.
//
// Usage: node server.js [--port N] [--host H] [--history N] [--max-clients N]
//                       [--rate-limit B:R|off] [--allow-origin URL]...
// Prints `listening ws=HOST:PORT` as its first stdout line. SIGTERM/SIGINT: close 1001, exit.
'use strict';

const http = require('http');
const crypto = require('crypto');
const { WebSocketServer, WebSocket } = require('ws');

// ---------------------------------------------------------------------------------------------
// Settings
const opts = {
  host: '127.0.0.1',
  port: 5002,
  history: 100,
  maxClients: 0, // 0: no cap
  rateLimit: null, // {burst, perSecond}; off by default (benchmarks)
  allowedOrigins: [],
  pingIntervalMs: 30000,
  idleTimeoutMs: 75000,
  maxPayload: 64 * 1024,
  // A client whose unsent bytes pass this is a slow consumer: close 1008, room told `left`.
  maxBufferedBytes: 1024 * 1024,
};

function usage(msg) {
  process.stderr.write(`server.js: ${msg}\n`);
  process.exit(2);
}

{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) usage(`${flag} needs a value`);
      return argv[++i];
    };
    const int = (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) usage(`${flag}: not a number: ${v}`);
      return n;
    };
    switch (flag) {
      case '--port': opts.port = int(val()); break;
      case '--host': opts.host = val(); break;
      case '--history': opts.history = int(val()); break;
      case '--max-clients': opts.maxClients = int(val()); break;
      case '--allow-origin': opts.allowedOrigins.push(val().toLowerCase()); break;
      case '--rate-limit': {
        const v = val();
        if (v === 'off') { opts.rateLimit = null; break; }
        const m = /^(\d+):(\d+(?:\.\d+)?)$/.exec(v);
        if (!m) usage(`--rate-limit: expected BURST:PER_SECOND or off, got ${v}`);
        opts.rateLimit = { burst: Number(m[1]), perSecond: Number(m[2]) };
        break;
      }
      default: usage(`unknown flag ${flag}`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Rooms
const RESERVED = new Set(['static', 'api', 'ws', 'healthz']);
const ROOM_RE = /^[a-z0-9_-]{1,64}$/;
const MAX_NAME = 32;
const MAX_TEXT = 4000;
const CONTROL_RE = /[\u0000-\u001f\u007f-\u009f]/;
const TYPING_EVERY_MS = 2000;

/** @type {Map<string, Room>} */
const rooms = new Map();
let epochCounter = 0;
let clientCount = 0;

class Room {
  constructor(name) {
    this.name = name;
    this.epoch = `${Date.now().toString(36)}-${crypto.randomBytes(4).toString('hex')}-${++epochCounter}`;
    this.nextId = 1;
    this.history = []; // ring buffer of message objects, oldest at histStart
    this.histStart = 0;
    this.persons = new Map(); // name -> Person
    this.sessions = new Map(); // session -> Person
    this.conns = new Set(); // joined connections
  }

  pushHistory(msg) {
    if (opts.history === 0) return;
    if (this.history.length < opts.history) {
      this.history.push(msg);
    } else {
      this.history[this.histStart] = msg;
      this.histStart = (this.histStart + 1) % opts.history;
    }
  }

  historySince(since) {
    const out = [];
    const n = this.history.length;
    for (let k = 0; k < n; k++) {
      const m = this.history[(this.histStart + k) % n];
      if (since === null || m.id > since) out.push(m);
    }
    return out;
  }

  uniqueName(name) {
    if (!this.persons.has(name)) return name;
    for (let k = 2; ; k++) {
      const candidate = `${name} (${k})`;
      if (!this.persons.has(candidate)) return candidate;
    }
  }

  /** Serialize once, send the same string to every joined connection except `except`'s. */
  broadcast(obj, exceptPerson) {
    const data = JSON.stringify(obj);
    for (const c of this.conns) {
      if (exceptPerson !== undefined && c.person === exceptPerson) continue;
      sendRaw(c, data);
    }
  }
}

class Person {
  constructor(name, session) {
    this.name = name;
    this.session = session;
    this.conns = new Set();
  }
}

// ---------------------------------------------------------------------------------------------
// Connections
function sendRaw(conn, data) {
  const ws = conn.ws;
  if (ws.readyState !== WebSocket.OPEN) return;
  if (ws.bufferedAmount > opts.maxBufferedBytes) {
    dropSlow(conn);
    return;
  }
  ws.send(data);
}

function sendObj(conn, obj) {
  sendRaw(conn, JSON.stringify(obj));
}

function sendError(conn, code, message) {
  sendObj(conn, { type: 'error', code, message });
}

function dropSlow(conn) {
  if (conn.dropped) return;
  conn.dropped = true;
  // The room is told it left right away, whatever the socket does next.
  leave(conn);
  try {
    conn.ws.close(1008, 'too slow');
  } catch (_) { /* already closing */ }
  // Its buffers are full: the close frame may never get out. Don't wait for it.
  setTimeout(() => conn.ws.terminate(), 1000).unref();
}

function leave(conn) {
  const room = conn.room;
  if (!room || !conn.person) return;
  const person = conn.person;
  conn.person = null;
  room.conns.delete(conn);
  person.conns.delete(conn);
  if (person.conns.size === 0) {
    room.persons.delete(person.name);
    if (person.session !== null) room.sessions.delete(person.session);
    room.broadcast({ type: 'left', name: person.name, ts: Date.now() });
  }
  if (room.conns.size === 0) rooms.delete(room.name); // forgotten: the next one gets a new epoch
}

function takeToken(conn) {
  const rl = opts.rateLimit;
  if (rl === null) return true;
  const now = Date.now();
  conn.tokens = Math.min(rl.burst, conn.tokens + ((now - conn.tokensAt) / 1000) * rl.perSecond);
  conn.tokensAt = now;
  if (conn.tokens < 1) return false;
  conn.tokens -= 1;
  return true;
}

function codePoints(s) {
  let n = 0;
  for (const _ of s) n++;
  return n;
}

function onHello(conn, msg) {
  if (conn.person) return sendError(conn, 'bad_request', 'already joined');
  if (typeof msg.name !== 'string') return sendError(conn, 'bad_request', 'hello needs a name');
  const name = msg.name.trim();
  if (name.length === 0 || codePoints(name) > MAX_NAME || CONTROL_RE.test(name)) {
    return sendError(conn, 'bad_name', 'a name is 1 to 32 characters, no control characters');
  }
  let session = null;
  if (msg.session !== undefined) {
    if (typeof msg.session !== 'string' || msg.session.length < 1 || codePoints(msg.session) > 64) {
      return sendError(conn, 'bad_request', 'session must be 1 to 64 characters');
    }
    session = msg.session;
  }
  let since = null;
  if (msg.since !== undefined) {
    if (typeof msg.since !== 'number' || !Number.isInteger(msg.since) || msg.since < 0) {
      return sendError(conn, 'bad_request', 'since must be a message id');
    }
    since = msg.since;
  }
  if (msg.epoch !== undefined && typeof msg.epoch !== 'string') {
    return sendError(conn, 'bad_request', 'epoch must be a string');
  }

  let room = rooms.get(conn.roomName);
  if (!room) {
    room = new Room(conn.roomName);
    rooms.set(room.name, room);
  }
  conn.room = room;

  let person = session !== null ? room.sessions.get(session) : undefined;
  const isNew = person === undefined;
  if (isNew) {
    person = new Person(room.uniqueName(name), session);
    room.persons.set(person.name, person);
    if (session !== null) room.sessions.set(session, person);
  }
  if (isNew) room.broadcast({ type: 'joined', name: person.name, ts: Date.now() });
  person.conns.add(conn);
  room.conns.add(conn);
  conn.person = person;

  const useSince = since !== null && msg.epoch === room.epoch ? since : null;
  sendObj(conn, {
    type: 'welcome',
    room: room.name,
    name: person.name,
    epoch: room.epoch,
    users: Array.from(room.persons.keys()),
    history: room.historySince(useSince),
  });
}

function onSay(conn, msg) {
  if (!conn.person) return sendError(conn, 'not_joined', 'say hello first');
  if (typeof msg.text !== 'string') return sendError(conn, 'bad_request', 'say needs a text');
  const text = msg.text.trim();
  if (text.length === 0) return sendError(conn, 'empty', 'nothing to say');
  if (text.length > MAX_TEXT && codePoints(text) > MAX_TEXT) {
    return sendError(conn, 'too_long', 'a message is at most 4000 characters');
  }
  if (!takeToken(conn)) return sendError(conn, 'rate_limited', 'slow down');
  const room = conn.room;
  const m = { type: 'message', id: room.nextId++, room: room.name, name: conn.person.name, text, ts: Date.now() };
  room.pushHistory(m);
  room.broadcast(m);
}

function onTyping(conn) {
  if (!conn.person) return sendError(conn, 'not_joined', 'say hello first');
  const now = Date.now();
  if (now - conn.lastTyping < TYPING_EVERY_MS) return;
  if (!takeToken(conn)) return sendError(conn, 'rate_limited', 'slow down');
  conn.lastTyping = now;
  conn.room.broadcast({ type: 'typing', name: conn.person.name }, conn.person);
}

function onMessage(conn, data, isBinary) {
  conn.lastSeen = Date.now();
  if (isBinary) return sendError(conn, 'bad_request', 'binary frames are not part of the protocol');
  let msg;
  try {
    msg = JSON.parse(data);
  } catch (_) {
    return sendError(conn, 'bad_request', 'not JSON');
  }
  if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
    return sendError(conn, 'bad_request', 'expected a JSON object');
  }
  switch (msg.type) {
    case 'say': return onSay(conn, msg);
    case 'hello': return onHello(conn, msg);
    case 'typing': return onTyping(conn);
    default: return sendError(conn, 'bad_request', 'unknown type');
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP + upgrade
function hostnameOf(hostHeader) {
  if (!hostHeader) return '';
  const h = hostHeader.toLowerCase();
  if (h.startsWith('[')) return h.slice(0, h.indexOf(']') + 1);
  const colon = h.lastIndexOf(':');
  return colon === -1 ? h : h.slice(0, colon);
}

function originAllowed(req) {
  const origin = req.headers.origin;
  if (origin === undefined) return true;
  let url;
  try {
    url = new URL(origin);
  } catch (_) {
    return false;
  }
  if (url.hostname.toLowerCase() === hostnameOf(req.headers.host)) return true;
  return opts.allowedOrigins.includes(origin.toLowerCase()) || opts.allowedOrigins.includes(url.origin.toLowerCase());
}

function refuse(socket, status, reason) {
  socket.end(`HTTP/1.1 ${status} ${reason}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
}

function roomFromPath(rawUrl) {
  const path = (rawUrl || '').split('?')[0];
  if (path === '/ws' || path === '/ws/') return 'general';
  if (!path.startsWith('/ws/')) return null;
  let room;
  try {
    room = decodeURIComponent(path.slice(4)).toLowerCase();
  } catch (_) {
    return null;
  }
  if (!ROOM_RE.test(room) || RESERVED.has(room)) return null;
  return room;
}

const httpServer = http.createServer((req, res) => {
  if (req.url === '/healthz') {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.end('ok\n');
    return;
  }
  res.writeHead(404, { 'Content-Type': 'text/plain' });
  res.end('not found\n');
});

const wss = new WebSocketServer({
  noServer: true,
  maxPayload: opts.maxPayload,
  perMessageDeflate: false,
  clientTracking: true,
});

httpServer.on('upgrade', (req, socket, head) => {
  const roomName = roomFromPath(req.url);
  if (roomName === null) return refuse(socket, 404, 'Not Found');
  if (!originAllowed(req)) return refuse(socket, 403, 'Forbidden');
  if (opts.maxClients > 0 && clientCount >= opts.maxClients) return refuse(socket, 503, 'Service Unavailable');
  socket.setNoDelay(true);
  clientCount++;
  wss.handleUpgrade(req, socket, head, (ws) => onConnection(ws, roomName));
});

function onConnection(ws, roomName) {
  const now = Date.now();
  const conn = {
    ws,
    roomName,
    room: null,
    person: null,
    dropped: false,
    lastSeen: now,
    lastTyping: 0,
    tokens: opts.rateLimit ? opts.rateLimit.burst : 0,
    tokensAt: now,
  };
  ws.on('message', (data, isBinary) => onMessage(conn, data, isBinary));
  ws.on('pong', () => { conn.lastSeen = Date.now(); });
  ws.on('ping', () => { conn.lastSeen = Date.now(); });
  ws.on('error', () => { /* 'close' follows */ });
  ws.on('close', () => {
    clientCount--;
    leave(conn);
  });
  ws.conn = conn;
}

// Heartbeat: ping every 30 s; close a client silent for 75 s.
const heartbeat = setInterval(() => {
  const now = Date.now();
  for (const ws of wss.clients) {
    if (now - ws.conn.lastSeen > opts.idleTimeoutMs) {
      ws.terminate();
    } else {
      try { ws.ping(); } catch (_) { /* closing */ }
    }
  }
}, opts.pingIntervalMs);
heartbeat.unref();

function shutdown() {
  for (const ws of wss.clients) {
    try { ws.close(1001, 'server shutting down'); } catch (_) { /* closing */ }
  }
  httpServer.close();
  setTimeout(() => process.exit(0), 500).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

httpServer.on('error', (err) => {
  process.stderr.write(`server.js: ${err.message}\n`);
  process.exit(1);
});
httpServer.listen(opts.port, opts.host, 1024, () => {
  const a = httpServer.address();
  process.stdout.write(`listening ws=${a.address}:${a.port}\n`);
});
