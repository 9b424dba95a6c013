// Shared pieces of the end-to-end tests: start the real server binary (and a redis-server for the
// cluster test), launch Chromium, drive the page.
import { spawn, spawnSync } from 'node:child_process';
import net from 'node:net';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(import.meta.dirname, '..', '..');
export const BIN = process.env.CHATROOM_BIN || path.join(ROOT, 'target', 'debug', 'chatroom');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

/**
 * Starts the server binary; resolves once its first stdout line says where it listens.
 * Pass `addr`/`wsAddr` to restart on the same ports. History stays in memory (`--data none`,
 * so a test run never writes ./chatroom-data) unless `extra` has its own `--data`.
 */
export function startServer({ addr = '127.0.0.1:0', wsAddr = '127.0.0.1:0', extra = [] } = {}) {
  const hasData = extra.some((a) => a === '--data' || a.startsWith('--data='));
  const data = hasData ? [] : ['--data', 'none'];
  // Every page of a suite connects from 127.0.0.1, dozens a minute: lift the per-address
  // limits (tests/it/addresses.rs proves them).
  const limits = ['--rate-limit', 'off', '--max-per-ip', 'off', '--handshake-rate', 'off'];
  const proc = spawn(BIN, ['--addr', addr, '--ws-addr', wsAddr, ...limits, ...data, ...extra], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  proc.stderr.on('data', (d) => { stderr = (stderr + d).slice(-20000); });
  const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  return new Promise((resolve, reject) => {
    let settled = false;
    const fail = (why) => {
      if (settled) return;
      settled = true;
      proc.kill('SIGKILL');
      reject(new Error(`${why}\n--- server stderr ---\n${stderr}`));
    };
    const timer = setTimeout(() => fail('server did not print its listening line within 15 s'), 15000);
    proc.once('error', (e) => { clearTimeout(timer); reject(e); });
    exited.then(({ code, signal }) => { clearTimeout(timer); fail(`server exited early (code ${code}, signal ${signal})`); });
    const lines = createInterface({ input: proc.stdout });
    lines.once('line', (line) => {
      clearTimeout(timer);
      const m = /^listening http=(\S+) ws=(\S+)$/.exec(line);
      if (!m) { fail(`unexpected first stdout line: ${JSON.stringify(line)}`); return; }
      settled = true;
      lines.on('line', () => {}); // keep draining stdout
      resolve({
        proc,
        http: m[1],
        ws: m[2],
        url: `http://${m[1]}`,
        stderr: () => stderr,
        exited,
        stop: () => stopProcess(proc, exited),
      });
    });
  });
}

/**
 * SIGTERM, then wait for the exit; SIGKILL if it takes over 20 s (the server promises 2 s; ten
 * times that keeps a loaded machine from failing a test). Resolves to the exit status.
 */
async function stopProcess(proc, exited) {
  if (proc.exitCode !== null || proc.signalCode !== null) return exited;
  proc.kill('SIGTERM');
  const t = setTimeout(() => proc.kill('SIGKILL'), 20000);
  const r = await exited;
  clearTimeout(t);
  return r;
}

export function launchBrowser() {
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 30000 });
}

/**
 * One server and one browser for a whole test file: started before its first test, closed after
 * its last. `env.server` may be replaced (a restart on the same ports); whichever is there at the
 * end is stopped and must exit cleanly.
 */
export function serverAndBrowser() {
  const env = { server: undefined, browser: undefined };
  before(async () => {
    env.server = await startServer();
    env.browser = await launchBrowser();
  });
  after(async () => {
    await env.browser?.close();
    if (env.server) {
      const r = await env.server.stop();
      assert.equal(r.code, 0, `server exit: ${JSON.stringify(r)}\n${env.server.stderr()}`);
    }
  });
  return env;
}

/**
 * Opens `${url}/${room}` in a fresh browser context (its own localStorage, so its own session),
 * picks `name` in the page's form and waits until connected.
 */
export async function join(browser, url, room, name, { viewport = { width: 1000, height: 700 }, colorScheme = 'light' } = {}) {
  const context = await browser.newContext({ viewport, colorScheme });
  return joinIn(context, url, room, name);
}

/**
 * Like `join`, in a context the caller made (with its own permissions or init scripts): opens
 * `${url}/${room}` in a new page of it, picks `name` and waits until connected.
 */
export async function joinIn(context, url, room, name) {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  // CSP violations show up as console errors: the page must need no exception to the policy.
  page.on('console', (m) => { if (m.type() === 'error' && /Content Security Policy/i.test(m.text())) errors.push(m.text()); });
  await page.goto(`${url}/${room}`);
  await page.waitForSelector('#name-input', { state: 'visible' });
  await page.fill('#name-input', name);
  await page.press('#name-input', 'Enter');
  await waitConnected(page);
  return { context, page, errors, name };
}

export function waitConnected(page, timeout = 15000) {
  return page.waitForSelector('#status[data-state="connected"]', { timeout });
}

/** Types `text` into the message box and presses Enter. */
export async function say(page, text) {
  await page.fill('#input', text);
  await page.press('#input', 'Enter');
}

/** Waits until a message whose text is exactly `text` is in the log. */
export function waitForMessage(page, text, timeout = 10000) {
  return page.waitForFunction(
    (t) => [...document.querySelectorAll('#log .msg .text')].some((e) => e.textContent === t),
    text,
    { timeout },
  );
}

/** Every message in the log, in order: { id, name, text, own }. */
export function messages(page) {
  return page.$$eval('#log .msg', (rows) => rows.map((r) => ({
    id: Number(r.dataset.id),
    name: r.querySelector('.who').textContent,
    text: r.querySelector('.text').textContent,
    own: r.classList.contains('own'),
  })));
}

/** Every joined/left line in the log, without its time. */
export function events(page) {
  // A row is `<bdi>name</bdi> joined · <time>`: its text up to the last separator.
  return page.$$eval('#log .event', (rows) => rows.map((r) => r.textContent.slice(0, r.textContent.lastIndexOf(' · '))));
}

/**
 * Polls the server's /healthz until `done(body)` holds, and returns that body: a wait for a
 * server state (such as a client being gone), failing after `timeout` ms.
 */
export async function waitForHealth(server, done, timeout = 10000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const body = await (await fetch(`${server.url}/healthz`)).json();
    if (done(body)) return body;
    if (Date.now() > deadline) throw new Error(`/healthz never satisfied ${done}: ${JSON.stringify(body)}`);
    await new Promise((resolve) => { setTimeout(resolve, 50); });
  }
}

export function rand() {
  return Math.random().toString(36).slice(2, 8);
}

// Waits until the element's whole text is `text` (names inside it may be in their own <bdi>,
// which Playwright's :text-is() does not see through).
export function waitForText(page, selector, text, timeout = 30000) {
  return page.waitForFunction(([sel, want]) => document.querySelector(sel)?.textContent === want,
    [selector, text], { timeout });
}

/**
 * Makes the page believe its tab is hidden (or visible again) and tells it so, as the browser
 * would: headless Chromium never hides a tab by itself, so the test stands in for it.
 */
export function setHidden(page, hidden) {
  return page.evaluate((h) => {
    Object.defineProperty(document, 'hidden', { configurable: true, get: () => h });
    Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => (h ? 'hidden' : 'visible') });
    document.dispatchEvent(new Event('visibilitychange'));
  }, hidden);
}

/**
 * Says each of `texts` in `room` as `name`, through a plain WebSocket of its own (opened from the
 * room's page in a fresh context, which waits for a name and does not connect itself, so the CSP
 * and Origin checks pass as for the page). Resolves to the ids the messages got, once every echo is back.
 */
export async function sayAll(browser, server, room, texts, name = 'filler') {
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    await page.goto(`${server.url}/${room}`); // a fresh context: the page asks for a name, connects not
    return await page.evaluate(({ url, list, who }) => new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      const ids = [];
      let me = null;
      ws.onopen = () => ws.send(JSON.stringify({ type: 'hello', name: who }));
      ws.onmessage = (ev) => {
        const f = JSON.parse(ev.data);
        if (f.type === 'welcome') {
          me = f.name;
          for (const text of list) ws.send(JSON.stringify({ type: 'say', text }));
        } else if (f.type === 'message' && f.name === me) {
          ids.push(f.id);
          if (ids.length === list.length) { ws.close(1000); resolve(ids); }
        } else if (f.type === 'error') {
          reject(new Error(`refused: ${ev.data}`));
        }
      };
      ws.onclose = (e) => { if (ids.length < list.length) reject(new Error(`closed ${e.code} after ${ids.length}`)); };
    }), { url: `ws://${server.ws}/ws/${room}`, list: texts, who: name });
  } finally {
    await context.close();
  }
}

/** The says the page has not seen echoed yet: { text, state } ("sending" or "failed"). */
export function outbox(page) {
  return page.$$eval('#log .out', (rows) => rows.map((r) => ({
    text: r.querySelector('.text').textContent,
    state: r.dataset.state,
  })));
}

/** Whether `redis-server` can be started (Debian's `redis-server` package). */
export function redisInstalled() {
  return spawnSync('redis-server', ['--version'], { stdio: 'ignore' }).status === 0;
}

/** A port of 127.0.0.1 that was free a moment ago (the kernel's pick for port 0). */
function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/**
 * Starts a redis-server on a free port of 127.0.0.1 (or on `port`, to start one again where
 * another was), without persistence: a stop loses every key, as a Redis without AOF or RDB does.
 * Resolves once it says it accepts connections: { port, url, stop(), stderr() }.
 */
export async function startRedis({ port } = {}) {
  // Another program may take the free port before redis-server binds it: try a few.
  for (let i = 0; i < 5; i++) {
    const p = port ?? await freePort();
    const redis = await spawnRedis(p);
    if (redis) return redis;
    if (port) break;
  }
  throw new Error(`redis-server did not start${port ? ` on port ${port}` : ' on any of 5 ports'}`);
}

function spawnRedis(port) {
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1',
    '--save', '', '--appendonly', 'no', '--loglevel', 'notice'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { proc.kill('SIGKILL'); reject(new Error(`redis-server did not start within 15 s\n${log}`)); }, 15000);
    proc.once('error', (e) => { clearTimeout(timer); reject(e); });
    exited.then(() => { clearTimeout(timer); resolve(null); }); // the port was taken: the caller tries another
    for (const stream of [proc.stdout, proc.stderr]) {
      stream.on('data', (d) => {
        log = (log + d).slice(-20000);
        if (!/Ready to accept connections/.test(log)) return;
        clearTimeout(timer);
        resolve({
          port,
          url: `redis://127.0.0.1:${port}`,
          log: () => log,
          stop: () => stopProcess(proc, exited),
        });
      });
    }
  });
}
