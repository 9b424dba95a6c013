// End-to-end: the server restarts under open pages; they reconnect by themselves.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, join, say, waitForMessage, waitConnected, messages } from './helpers.mjs';

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

const count = (ms, text) => ms.filter((m) => m.text === text).length;

test('restart under the pages: reconnecting, back by themselves, nothing duplicated or lost', { timeout: 60000 }, async () => {
  const alice = await join(browser, server.url, 'restart', 'alice');
  const bob = await join(browser, server.url, 'restart', 'bob');
  await say(alice.page, 'before 1');
  await say(bob.page, 'before 2');
  for (const u of [alice, bob]) await waitForMessage(u.page, 'before 2');
  for (const u of [alice, bob]) await waitForMessage(u.page, 'before 1');

  const stopped = await server.stop();
  assert.equal(stopped.code, 0, `SIGTERM exit: ${JSON.stringify(stopped)}`);
  for (const u of [alice, bob]) {
    await u.page.waitForSelector('#status[data-state="reconnecting"]:has-text("Reconnecting")', { timeout: 10000 });
  }

  // Typed while offline: Enter does not lose it; it stays in the box with an explanation.
  await say(alice.page, 'typed while offline');
  assert.equal(await alice.page.inputValue('#input'), 'typed while offline');
  await alice.page.waitForSelector('#send-error:has-text("Not connected")');

  server = await startServer({ addr: server.http, wsAddr: server.ws });
  for (const u of [alice, bob]) await waitConnected(u.page, 30000);

  // The epoch changed (ids restarted): the list starts afresh from the new history (empty).
  for (const u of [alice, bob]) assert.deepEqual(await messages(u.page), []);
  assert.equal(await alice.page.textContent('#people-count'), '2');

  await alice.page.press('#input', 'Enter'); // sends the kept message now
  await waitForMessage(bob.page, 'typed while offline');
  assert.equal(await alice.page.inputValue('#input'), '');
  await say(bob.page, 'after restart, from bob');
  await waitForMessage(alice.page, 'after restart, from bob');
  await say(alice.page, 'after restart, from alice');
  for (const u of [alice, bob]) await waitForMessage(u.page, 'after restart, from alice');
  for (const u of [alice, bob]) await waitForMessage(u.page, 'after restart, from bob');

  const expected = ['typed while offline', 'after restart, from bob', 'after restart, from alice'];
  for (const u of [alice, bob]) {
    const ms = await messages(u.page);
    for (const t of expected) assert.equal(count(ms, t), 1, `${u.name}: ${t} in ${JSON.stringify(ms)}`);
    for (const t of ['before 1', 'before 2']) assert.equal(count(ms, t), 0, `${u.name}: ${t} in ${JSON.stringify(ms)}`);
    assert.deepEqual(ms.map((m) => m.text), expected);
    assert.equal(new Set(ms.map((m) => m.id)).size, ms.length);
  }

  // A newcomer after the restart sees the same history, once.
  const carol = await join(browser, server.url, 'restart', 'carol');
  assert.deepEqual((await messages(carol.page)).map((m) => m.text), expected);

  for (const u of [alice, bob, carol]) {
    assert.deepEqual(u.errors, []);
    await u.context.close();
  }
});
