// End-to-end: several chatroom processes sharing rooms through one real redis-server (`--redis`).
// Needs redis-server: run.sh leaves this file out, loudly, when it is missing, unless
// CHATROOM_REQUIRE_REDIS=1 (CI), which makes that a failure.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, startRedis, redisInstalled, launchBrowser, join, joinIn, say, waitForMessage, waitConnected,
  waitForHealth, messages, outbox,
} from './helpers.mjs';

const skip = redisInstalled() ? false : 'redis-server is not installed (apt-get install redis-server)';
const servers = [];
const redises = [];
let browser;
after(async () => {
  await browser?.close();
  for (const s of servers) await s.stop();
  for (const r of redises) await r.stop();
});

/** A redis-server, and `n` chatroom processes sharing rooms through it. */
async function cluster(n) {
  const redis = await startRedis();
  redises.push(redis);
  const procs = [];
  for (let i = 0; i < n; i++) {
    const s = await startServer({ extra: ['--redis', redis.url] });
    servers.push(s);
    procs.push(s);
  }
  browser ??= await launchBrowser();
  return { redis, procs };
}

const people = (page) => page.$$eval('#people-list li', (li) => li.map((x) => x.textContent).sort());

test('alice on process A and bob on process B chat both ways in /room2', { skip, timeout: 60000 }, async () => {
  const { procs: [a, b] } = await cluster(2);
  assert.notEqual(a.ws, b.ws);
  const alice = await join(browser, a.url, 'room2', 'alice');
  const bob = await join(browser, b.url, 'room2', 'bob');
  // Each page talks to the process that served it: one client each.
  for (const s of [a, b]) await waitForHealth(s, (h) => h.clients === 1 && h.bus?.state === 'up');

  // Presence crosses processes: each sees both names (alice also hears that bob joined).
  await alice.page.waitForSelector('#people-count:text-is("2")');
  await alice.page.waitForSelector('#log .event:text("bob joined")');
  assert.deepEqual(await people(alice.page), ['alice (you)', 'bob']);
  assert.deepEqual(await people(bob.page), ['alice', 'bob (you)']);

  await say(alice.page, 'hello bob, from process A');
  await waitForMessage(bob.page, 'hello bob, from process A');
  await say(bob.page, 'hi alice, from process B');
  await waitForMessage(alice.page, 'hi alice, from process B');
  await waitForMessage(bob.page, 'hi alice, from process B');

  // One conversation: the same messages, ids and order on both pages.
  const want = [['alice', 'hello bob, from process A'], ['bob', 'hi alice, from process B']];
  const seen = [];
  for (const u of [alice, bob]) {
    const ms = await messages(u.page);
    assert.deepEqual(ms.map((m) => [m.name, m.text]), want, `${u.name}: ${JSON.stringify(ms)}`);
    assert.deepEqual(ms.map((m) => m.own), [u === alice, u === bob], 'own messages are marked');
    assert.ok(ms[0].id < ms[1].id);
    seen.push(ms.map((m) => m.id));
  }
  assert.deepEqual(seen[0], seen[1]);

  // bob leaves process B: alice, on A, is told.
  await bob.context.close();
  await alice.page.waitForSelector('#log .event:text("bob left")');
  assert.deepEqual(await people(alice.page), ['alice (you)']);
  assert.deepEqual(alice.errors, []);
  assert.deepEqual(bob.errors, []);
  await alice.context.close();
});

test('Redis down: a say is refused as unavailable and comes back; Redis back empty: the page moves to the new epoch',
  { skip, timeout: 120000 }, async () => {
    let { redis, procs: [a] } = await cluster(1);
    const context = await browser.newContext();
    // Note every close the page sees, to tell the server's 1012 (service restart) from others.
    await context.addInitScript(() => {
      window.closeCodes = [];
      const Native = window.WebSocket;
      window.WebSocket = class extends Native {
        constructor(...args) {
          super(...args);
          this.addEventListener('close', (e) => window.closeCodes.push(e.code));
        }
      };
    });
    const alice = await joinIn(context, a.url, 'outage', 'alice');
    await say(alice.page, 'before the outage');
    await waitForMessage(alice.page, 'before the outage');

    await redis.stop();
    await waitForHealth(a, (h) => h.bus?.state === 'down' && h.status === 'degraded', 30000);
    // The connection stays up; the say is refused with its text, which goes back in the box.
    await say(alice.page, 'said while Redis is down');
    await alice.page.waitForSelector('#send-error:has-text("cannot be reached")', { timeout: 30000 });
    await alice.page.waitForFunction(() => document.querySelector('#input').value === 'said while Redis is down');
    assert.deepEqual(await outbox(alice.page), [{ text: 'said while Redis is down', state: 'failed' }]);
    assert.equal(await alice.page.textContent('#log .out .out-state'), 'not sent (service unavailable)');
    assert.equal(await alice.page.getAttribute('#status', 'data-state'), 'connected');
    assert.deepEqual((await messages(alice.page)).map((m) => m.text), ['before the outage']);

    // A Redis without persistence comes back empty: the room's history is gone. The server
    // closes the room's clients with 1012; the page reconnects by itself and, the epoch being
    // new, shows the new (empty) history instead of the old messages.
    redis = await startRedis({ port: redis.port });
    redises.push(redis);
    await alice.page.waitForFunction(() => window.closeCodes.includes(1012), null, { timeout: 60000 });
    await waitConnected(alice.page, 60000);
    await alice.page.waitForFunction(() => document.querySelectorAll('#log .msg').length === 0);
    await waitForHealth(a, (h) => h.bus?.state === 'up' && h.status === 'ok', 30000);

    // The refused text is still in the box: Enter sends it now.
    await alice.page.press('#input', 'Enter');
    await waitForMessage(alice.page, 'said while Redis is down');
    assert.deepEqual((await messages(alice.page)).map((m) => m.text), ['said while Redis is down']);
    assert.deepEqual(await outbox(alice.page), []);
    assert.deepEqual(await alice.page.evaluate(() => window.closeCodes), [1012]);
    assert.deepEqual(alice.errors, []);
    await context.close();
  });
