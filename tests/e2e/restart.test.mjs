// End-to-end: the server restarts under open pages; they reconnect by themselves. In memory
// (the default here) a restart starts rooms afresh; with --data the conversation is still there.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { serverAndBrowser, startServer, join, say, waitForMessage, waitConnected, messages, outbox, rand } from './helpers.mjs';

const env = serverAndBrowser();

const count = (ms, text) => ms.filter((m) => m.text === text).length;

test('restart under the pages: reconnecting, back by themselves, nothing duplicated or lost', { timeout: 120000 }, async () => {
  const alice = await join(env.browser, env.server.url, 'restart', 'alice');
  const bob = await join(env.browser, env.server.url, 'restart', 'bob');
  await say(alice.page, 'before 1');
  await say(bob.page, 'before 2');
  for (const u of [alice, bob]) await waitForMessage(u.page, 'before 2');
  for (const u of [alice, bob]) await waitForMessage(u.page, 'before 1');

  const stopped = await env.server.stop();
  assert.equal(stopped.code, 0, `SIGTERM exit: ${JSON.stringify(stopped)}`);
  for (const u of [alice, bob]) {
    await u.page.waitForSelector('#status[data-state="reconnecting"]:has-text("Reconnecting")', { timeout: 10000 });
  }

  // Typed while offline: Enter does not lose it; it waits as "sending…" and goes out by itself
  // once the page is back.
  await say(alice.page, 'typed while offline');
  assert.equal(await alice.page.inputValue('#input'), '');
  assert.deepEqual(await outbox(alice.page), [{ text: 'typed while offline', state: 'sending' }]);

  env.server = await startServer({ addr: env.server.http, wsAddr: env.server.ws });
  for (const u of [alice, bob]) await waitConnected(u.page, 60000);

  // The epoch changed (ids restarted): the list starts afresh from the new history, which
  // holds no more than the message alice's page sent again after its welcome.
  for (const u of [alice, bob]) await waitForMessage(u.page, 'typed while offline');
  for (const u of [alice, bob]) assert.deepEqual((await messages(u.page)).map((m) => m.text), ['typed while offline']);
  assert.deepEqual(await outbox(alice.page), []);
  // The two pages reconnect in either order: alice's count reaches 2 when both are back.
  await alice.page.waitForSelector('#people-count:text-is("2")');
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
  const carol = await join(env.browser, env.server.url, 'restart', 'carol');
  assert.deepEqual((await messages(carol.page)).map((m) => m.text), expected);

  for (const u of [alice, bob, carol]) {
    assert.deepEqual(u.errors, []);
    await u.context.close();
  }
});

test('with --data, history survives a restart: a new page sees it, an open page has each message once', { timeout: 120000 }, async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'chatroom-e2e-'));
  let disk;
  let alice;
  let carol;
  try {
    disk = await startServer({ extra: ['--data', dir] });
    const room = `kept-${rand()}`;
    alice = await join(env.browser, disk.url, room, 'alice');
    await say(alice.page, 'first, kept');
    await waitForMessage(alice.page, 'first, kept');
    await say(alice.page, 'second, kept');
    await waitForMessage(alice.page, 'second, kept');
    const kept = ['first, kept', 'second, kept'];

    const stopped = await disk.stop();
    assert.equal(stopped.code, 0, `SIGTERM exit: ${JSON.stringify(stopped)}`);
    await alice.page.waitForSelector('#status[data-state="reconnecting"]', { timeout: 10000 });
    disk = await startServer({ addr: disk.http, wsAddr: disk.ws, extra: ['--data', dir] });
    await waitConnected(alice.page, 60000);

    // A page opened after the restart (its own browser context) gets the history, in order.
    carol = await join(env.browser, disk.url, room, 'carol');
    assert.deepEqual((await messages(carol.page)).map((m) => m.text), kept);

    // alice's page was open throughout: once carol's message has reached it, it has resumed,
    // and it shows each kept message exactly once, then carol's.
    await say(carol.page, 'after the restart');
    await waitForMessage(alice.page, 'after the restart');
    const ms = await messages(alice.page);
    assert.deepEqual(ms.map((m) => m.text), [...kept, 'after the restart'], JSON.stringify(ms));
    assert.equal(new Set(ms.map((m) => m.id)).size, ms.length);
    for (const u of [alice, carol]) assert.deepEqual(u.errors, []);
  } finally {
    await alice?.context.close();
    await carol?.context.close();
    await disk?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});
