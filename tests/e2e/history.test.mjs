// End-to-end: older messages (a scroll to the top, or the "Load earlier messages" button, loads
// the page before, with no jump, up to "This is the beginning of #room"), and says that arrive
// exactly once across a cut connection (a cid on each; resent after the welcome).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  startServer, launchBrowser, join, joinIn, say, waitForMessage, messages, outbox, sayAll, rand,
} from './helpers.mjs';

let browser;
let disk; // history on disk, only 20 messages in memory: older pages come from the store
let dir;

before(async () => {
  dir = mkdtempSync(path.join(tmpdir(), 'chatroom-e2e-history-'));
  disk = await startServer({ extra: ['--data', dir, '--history', '20'] });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await disk?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const TOTAL = 150;
const texts = Array.from({ length: TOTAL }, (_, i) => `old ${i + 1}`);
const count = (ms, text) => ms.filter((m) => m.text === text).length;
const rowCount = (page) => page.$$eval('#log .msg', (r) => r.length);

/** Everything is there: each of the 150 once, in id order, grouped as one run of one sender. */
async function assertAll(page) {
  const ms = await messages(page);
  assert.deepEqual(ms.map((m) => m.text), texts);
  for (let i = 1; i < ms.length; i++) assert.ok(ms[i - 1].id < ms[i].id, `ids in order at ${i}`);
  // Sent within a few seconds by one person: one group, its name shown once (pages joined up).
  assert.equal(await page.$$eval('#log .msg:not(.cont)', (r) => r.length), 1);
  assert.equal(await page.textContent('#log-start'), `This is the beginning of #${page.url().split('/').pop()}`);
  assert.equal(await page.isVisible('#log-start'), true);
  assert.equal(await page.isVisible('#older'), false);
}

test('older messages: scrolling to the top loads the pages before, without a jump, to the start of the room', { timeout: 120000 }, async () => {
  const room = `older-${rand()}`;
  await sayAll(browser, disk, room, texts);
  const alice = await join(browser, disk.url, room, 'alice', { viewport: { width: 800, height: 500 } });
  const page = alice.page;
  // The welcome holds what memory holds: the last 20.
  assert.deepEqual((await messages(page)).map((m) => m.text), texts.slice(-20));
  await page.waitForSelector('#older:visible:text-is("Load earlier messages")');
  assert.equal(await page.isVisible('#log-start'), false);

  let pages = 0;
  while (!(await page.isVisible('#log-start'))) {
    assert.ok(++pages <= 5, 'at most 4 pages of 50 before the start');
    const n = await rowCount(page);
    // Scroll to the top, and note where the first message in view is, before the answer can
    // come (the scroll event, and so the request, comes after this script).
    const seen = await page.$eval('#log', (l) => {
      l.scrollTop = 0;
      const top = l.getBoundingClientRect().top;
      const row = [...l.querySelectorAll('.msg')].find((r) => r.getBoundingClientRect().bottom > top);
      return { id: row.dataset.id, y: row.querySelector('.text').getBoundingClientRect().top };
    });
    await page.waitForFunction((k) => document.querySelectorAll('#log .msg').length > k
      || !document.querySelector('#log-start').hidden, n);
    // Wait for the answer's rendering to settle (the button is back, or the start is shown).
    await page.waitForFunction(() => {
      const older = document.querySelector('#older');
      return (!older.hidden && older.textContent === 'Load earlier messages') || !document.querySelector('#log-start').hidden;
    });
    const y = await page.$eval(`#log .msg[data-id="${seen.id}"] .text`, (t) => t.getBoundingClientRect().top);
    assert.ok(Math.abs(y - seen.y) <= 3, `page ${pages}: message ${seen.id} moved from ${seen.y} to ${y}`);
  }
  assert.equal(pages, 3, '20 + 50 + 50 + 30');
  await assertAll(page);
  assert.deepEqual(alice.errors, []);
  await alice.context.close();
});

test('older messages by keyboard: Tab to "Load earlier messages", Enter, until the start; focus stays in the log', { timeout: 120000 }, async () => {
  const room = `keys-${rand()}`;
  await sayAll(browser, disk, room, texts);
  // Tall enough for the 20 of the welcome: nothing scrolls, so only the keyboard loads.
  const bob = await join(browser, disk.url, room, 'bob', { viewport: { width: 900, height: 1400 } });
  const page = bob.page;
  assert.equal(await rowCount(page), 20);
  await page.focus('#log');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'older');
  for (const want of [70, 120, 150]) {
    await page.keyboard.press('Enter');
    await page.waitForFunction((k) => document.querySelectorAll('#log .msg').length === k, want);
  }
  await page.waitForSelector('#log-start:visible');
  await assertAll(page);
  // The button went away under the keyboard: focus is on the log, not lost to the page.
  assert.equal(await page.evaluate(() => document.activeElement.id), 'log');
  assert.deepEqual(bob.errors, []);
  await bob.context.close();
});

/**
 * alice's page with its WebSocket through a relay the test controls: `cut()` closes the link
 * (the page reconnects through the relay), `blocked` closes new connections at once, `dropEchoes` keeps messages from reaching the page,
 * `stripFromWelcome(text)` takes a message out of the next welcome's history, and `refuseHistory`
 * answers history requests with `rate_limited` as the server would.
 */
async function relayed(server, room, name) {
  const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
  const r = { sent: [], blocked: false, dropEchoes: false, strip: null, refuseHistory: false, link: null, context };
  await context.routeWebSocket(/\/ws\//, (ws) => {
    if (r.blocked) { ws.close({ code: 4000, reason: 'test: network down' }); return; }
    const srv = ws.connectToServer();
    ws.onMessage((m) => {
      const f = JSON.parse(m);
      r.sent.push(f);
      if (f.type === 'history' && r.refuseHistory) {
        ws.send(JSON.stringify({ type: 'error', code: 'rate_limited', message: 'slow down' }));
        return;
      }
      srv.send(m);
    });
    srv.onMessage((m) => {
      const f = JSON.parse(m);
      if (f.type === 'message' && r.dropEchoes) return;
      if (f.type === 'welcome' && r.strip) {
        f.history = f.history.filter((x) => x.text !== r.strip);
        r.strip = null;
        ws.send(JSON.stringify(f));
        return;
      }
      ws.send(m);
    });
    r.link = { ws, srv };
  });
  r.cut = () => {
    r.link.ws.close({ code: 4000, reason: 'test: network down' });
    r.link.srv.close();
  };
  Object.assign(r, await joinIn(context, server.url, room, name));
  return r;
}

test('a message sent while the connection is cut shows "sending…", then arrives exactly once everywhere', { timeout: 120000 }, async () => {
  const room = `cut-${rand()}`;
  const alice = await relayed(disk, room, 'alice');
  const bob = await join(browser, disk.url, room, 'bob');
  await say(alice.page, 'before the cut');
  await waitForMessage(bob.page, 'before the cut');
  await waitForMessage(alice.page, 'before the cut');

  // The relay refuses new connections until the message is typed, so the page is surely offline.
  alice.blocked = true;
  alice.cut();
  await alice.page.waitForSelector('#status[data-state="reconnecting"]');
  await say(alice.page, 'typed while cut');
  await alice.page.waitForSelector('#log .out[data-state="sending"]:has-text("typed while cut") .out-state:text-is("sending…")');
  assert.equal(await alice.page.inputValue('#input'), '', 'the box is free for the next message');
  assert.equal(count(await messages(alice.page), 'typed while cut'), 0);
  alice.blocked = false;

  await waitForMessage(bob.page, 'typed while cut', 30000);
  await waitForMessage(alice.page, 'typed while cut', 30000);
  await alice.page.waitForSelector('#log .out', { state: 'detached' });
  await say(bob.page, 'after, from bob');
  for (const u of [alice, bob]) await waitForMessage(u.page, 'after, from bob');
  for (const u of [alice, bob]) {
    const ms = await messages(u.page);
    assert.deepEqual(ms.map((m) => m.text), ['before the cut', 'typed while cut', 'after, from bob'], `${u.name}: ${JSON.stringify(ms)}`);
  }
  assert.deepEqual(await outbox(alice.page), []);
  // Sent once, after the welcome, with a cid.
  const says = alice.sent.filter((f) => f.type === 'say' && f.text === 'typed while cut');
  assert.equal(says.length, 1);
  assert.equal(typeof says[0].cid, 'string');
  for (const u of [alice, bob]) assert.deepEqual(u.errors, []);
  await alice.context.close();
  await bob.context.close();
});

test('the say reached the server but its echo was lost: once, from the welcome or from a resend the server answers once', { timeout: 120000 }, async () => {
  const room = `echo-${rand()}`;
  const alice = await relayed(disk, room, 'alice');
  const bob = await join(browser, disk.url, room, 'bob');

  // 1. The echo is lost, the connection drops: the welcome's history (since the last id seen)
  //    holds the message with its cid, so the page takes it from there and sends nothing again.
  alice.dropEchoes = true;
  await say(alice.page, 'echo lost 1');
  await waitForMessage(bob.page, 'echo lost 1'); // the server has it
  assert.deepEqual(await outbox(alice.page), [{ text: 'echo lost 1', state: 'sending' }]);
  alice.dropEchoes = false;
  alice.cut();
  await waitForMessage(alice.page, 'echo lost 1', 30000);
  assert.deepEqual(await outbox(alice.page), []);
  assert.equal(alice.sent.filter((f) => f.type === 'say' && f.text === 'echo lost 1').length, 1, 'not sent again');

  // 2. The same, but the welcome does not hold it (the relay takes it out): the page sends it
  //    again with the same cid; the server answers with the original, to alice only.
  alice.dropEchoes = true;
  await say(alice.page, 'echo lost 2');
  await waitForMessage(bob.page, 'echo lost 2');
  alice.dropEchoes = false;
  alice.strip = 'echo lost 2';
  alice.cut();
  await waitForMessage(alice.page, 'echo lost 2', 30000);
  await alice.page.waitForSelector('#log .out', { state: 'detached' });
  const again = alice.sent.filter((f) => f.type === 'say' && f.text === 'echo lost 2');
  assert.equal(again.length, 2, 'sent again after the welcome');
  assert.equal(again[0].cid, again[1].cid, 'with the same cid');

  await say(bob.page, 'end');
  for (const u of [alice, bob]) await waitForMessage(u.page, 'end');
  const [a, b] = [await messages(alice.page), await messages(bob.page)];
  assert.deepEqual(a.map((m) => m.text), ['echo lost 1', 'echo lost 2', 'end'], JSON.stringify(a));
  assert.deepEqual(a.map((m) => m.id), b.map((m) => m.id), 'the same messages, the same ids');
  assert.deepEqual(b.map((m) => m.text), ['echo lost 1', 'echo lost 2', 'end'], JSON.stringify(b));
  for (const u of [alice, bob]) assert.deepEqual(u.errors, []);
  await alice.context.close();
  await bob.context.close();
});

test('unsent says survive a reload (sessionStorage): sent again with their cid, shown once', { timeout: 120000 }, async () => {
  const room = `reload-${rand()}`;
  const alice = await relayed(disk, room, 'alice');
  const bob = await join(browser, disk.url, room, 'bob');
  // The echo is lost and the page reloaded before it could come: the new page has no `since`,
  // and the relay takes the message out of its welcome, so only the resend can bring it back.
  alice.dropEchoes = true;
  await say(alice.page, 'said, then reloaded');
  await waitForMessage(bob.page, 'said, then reloaded');
  alice.strip = 'said, then reloaded';
  await alice.page.reload();
  alice.dropEchoes = false;
  await waitForMessage(alice.page, 'said, then reloaded', 30000);
  await alice.page.waitForSelector('#log .out', { state: 'detached' });
  const says = alice.sent.filter((f) => f.type === 'say' && f.text === 'said, then reloaded');
  assert.equal(says.length, 2);
  assert.equal(says[0].cid, says[1].cid);
  await say(bob.page, 'end');
  for (const u of [alice, bob]) await waitForMessage(u.page, 'end');
  for (const u of [alice, bob]) {
    assert.deepEqual((await messages(u.page)).map((m) => m.text), ['said, then reloaded', 'end'], u.name);
  }
  assert.equal(await alice.page.evaluate(() => Object.keys(sessionStorage).filter((k) => k.startsWith('chatroom.outbox')).length), 0);
  for (const u of [alice, bob]) assert.deepEqual(u.errors, []);
  await alice.context.close();
  await bob.context.close();
});

test('history refused as too fast: said quietly at the top, and the next click loads it', { timeout: 60000 }, async () => {
  const room = `slow-${rand()}`;
  await sayAll(browser, disk, room, ['one', 'two', 'three', 'four']);
  const alice = await relayed(disk, room, 'alice');
  alice.refuseHistory = true;
  await alice.page.click('#older');
  await alice.page.waitForSelector('#older-note:text-is("Too fast: try again in a moment.")');
  await alice.page.waitForSelector('#older:visible:text-is("Load earlier messages")');
  assert.equal(await alice.page.textContent('#send-error'), '', 'not shown as a refused message');
  alice.refuseHistory = false;
  await alice.page.click('#older');
  // All four were in the welcome: the answer is the start of the room.
  await alice.page.waitForSelector('#log-start:visible');
  assert.equal(await alice.page.textContent('#older-note'), '');
  assert.deepEqual((await messages(alice.page)).map((m) => m.text), ['one', 'two', 'three', 'four']);
  assert.equal(alice.sent.filter((f) => f.type === 'history').length, 2);
  assert.deepEqual(alice.errors, []);
  await alice.context.close();
});

test('after a reconnect, the older pages already loaded stay', { timeout: 120000 }, async () => {
  const room = `stay-${rand()}`;
  await sayAll(browser, disk, room, texts.slice(0, 60));
  const alice = await relayed(disk, room, 'alice');
  assert.equal(await rowCount(alice.page), 20);
  await alice.page.click('#older');
  await alice.page.waitForFunction(() => document.querySelectorAll('#log .msg').length === 60);
  await alice.page.waitForSelector('#log-start:visible');
  alice.cut();
  await alice.page.waitForSelector('#status[data-state="reconnecting"]');
  await sayAll(browser, disk, room, ['while away']);
  await waitForMessage(alice.page, 'while away', 30000);
  assert.deepEqual((await messages(alice.page)).map((m) => m.text), [...texts.slice(0, 60), 'while away']);
  assert.equal(await alice.page.isVisible('#log-start'), true);
  assert.deepEqual(alice.errors, []);
  await alice.context.close();
});
