// End-to-end, issue 13 item 2: "New private room".
// The real server binary and the page in headless Chromium; every wait is on page state.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, launchBrowser, join, joinIn, say, waitForMessage, waitConnected, rand,
} from './helpers.mjs';

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  if (server) {
    const r = await server.stop();
    assert.equal(r.code, 0, `server exit: ${JSON.stringify(r)}\n${server.stderr()}`);
  }
});

async function closeAll(...users) {
  for (const u of users) {
    assert.deepEqual(u.errors, [], `page errors for ${u.name}`);
    await u.context.close();
  }
}

const ROOM_RULE = /^[a-z0-9_-]{1,64}$/; // PROTOCOL.md
const RESERVED = ['static', 'api', 'ws', 'healthz'];
/** Bits of a name drawn uniformly from `alphabetSize` letters. */
const bits = (name, alphabetSize) => name.length * Math.log2(alphabetSize);
const roomOf = (page) => new URL(page.url()).pathname.slice(1);

test('"New private room": a valid name of at least 80 bits, a new one each time; the page lands there connected and offers the link', { timeout: 60000 }, async () => {
  const start = `start-${rand()}`;
  const context = await browser.newContext();
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: server.url });
  const alice = await joinIn(context, server.url, start, 'alice');
  const { page } = alice;
  assert.equal(await page.isVisible('#created'), false, 'no notice in a room that was only opened');

  const created = [];
  for (const how of ['click', 'keyboard']) {
    const from = roomOf(page);
    const button = page.getByRole('button', { name: 'New private room' });
    const moved = page.waitForURL((u) => u.pathname !== `/${from}`);
    if (how === 'click') await button.click();
    else { await button.focus(); await page.keyboard.press('Enter'); }
    await moved;
    await waitConnected(page);
    const name = roomOf(page);
    created.push(name);
    assert.match(name, /^[a-z0-9]+$/, `the alphabet: ${name}`);
    assert.match(name, ROOM_RULE);
    assert.ok(name.length >= 17, `${name}: ${name.length} characters`);
    assert.ok(bits(name, 36) >= 80, `${name}: ${bits(name, 36)} bits`);
    assert.equal(await page.textContent('#room-name'), name);

    // The new room says what it is and offers its link, with focus on the copy button.
    const notice = page.getByRole('region', { name: 'Private room created: anyone with this link can read it.' });
    assert.equal(await notice.isVisible(), true);
    assert.equal(await page.textContent('#created-link'), `${server.url}/${name}`);
    assert.equal(await page.evaluate(() => document.activeElement.id), 'created-copy');
    await page.keyboard.press('Enter');
    await page.waitForSelector('#created-copy:text-is("Copied!")');
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), `${server.url}/${name}`);
  }
  // Dismiss hides the notice and puts focus in the message box.
  await page.getByRole('button', { name: 'Dismiss' }).click();
  assert.equal(await page.isVisible('#created'), false);
  assert.equal(await page.evaluate(() => document.activeElement.id), 'input');
  assert.notEqual(created[0], created[1]);

  // Someone with the link lands in the same room, without the notice.
  const bob = await join(browser, server.url, created[1], 'bob');
  assert.equal(await bob.page.isVisible('#created'), false);
  await say(bob.page, 'found it');
  await waitForMessage(page, 'found it');
  // The notice is shown once: a reload of the new room no longer has it.
  await page.reload();
  await waitConnected(page);
  assert.equal(await page.isVisible('#created'), false);
  await closeAll(alice, bob);
});

test('"New private room" 200 times: 200 distinct names, each a valid room name', { timeout: 60000 }, async () => {
  const alice = await join(browser, server.url, `many-${rand()}`, 'alice');
  const { page } = alice;
  // Each navigation the button starts is recorded and aborted (as if never sent), so the page
  // stays where it is and the button can be pressed again.
  const names = [];
  let recorded = null;
  await page.route((url) => url.origin === server.url && url.pathname !== '/' && !url.pathname.startsWith('/static/')
    && url.pathname.split('/').length === 2, (route) => {
    if (!route.request().isNavigationRequest()) { route.continue(); return; }
    names.push(new URL(route.request().url()).pathname.slice(1));
    route.abort('aborted');
    recorded?.();
  });
  for (let i = 0; i < 200; i++) {
    const done = new Promise((resolve) => { recorded = resolve; });
    await page.evaluate(() => document.getElementById('new-room').click());
    await done;
  }
  assert.equal(names.length, 200);
  assert.equal(new Set(names).size, 200, 'all distinct');
  for (const n of names) {
    assert.match(n, /^[a-z0-9]{17,64}$/);
    assert.ok(!RESERVED.includes(n));
  }
  // Every letter of the alphabet shows up in 200 × 20 draws (each is missed with odds 10^-48).
  assert.equal(new Set(names.join('')).size, 36, 'the whole alphabet a-z0-9 is used');
  await closeAll(alice);
});
