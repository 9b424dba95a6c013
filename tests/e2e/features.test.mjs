// End-to-end, issue 13 items 2 and 3: "New private room", mentions, desktop notifications.
// The real server binary and the page in headless Chromium; every wait is on page state.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  serverAndBrowser, join, joinIn, say, waitForMessage, waitConnected, rand, setHidden,
} from './helpers.mjs';

const env = serverAndBrowser();

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
  const context = await env.browser.newContext();
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: env.server.url });
  const alice = await joinIn(context, env.server.url, start, 'alice');
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
    assert.equal(await page.textContent('#created-link'), `${env.server.url}/${name}`);
    assert.equal(await page.evaluate(() => document.activeElement.id), 'created-copy');
    await page.keyboard.press('Enter');
    await page.waitForSelector('#created-copy:text-is("Copied!")');
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), `${env.server.url}/${name}`);
  }
  // Dismiss hides the notice and puts focus in the message box.
  await page.getByRole('button', { name: 'Dismiss' }).click();
  assert.equal(await page.isVisible('#created'), false);
  assert.equal(await page.evaluate(() => document.activeElement.id), 'input');
  assert.notEqual(created[0], created[1]);

  // Someone with the link lands in the same room, without the notice.
  const bob = await join(env.browser, env.server.url, created[1], 'bob');
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
  const alice = await join(env.browser, env.server.url, `many-${rand()}`, 'alice');
  const { page } = alice;
  // Each navigation the button starts is recorded and aborted (as if never sent), so the page
  // stays where it is and the button can be pressed again.
  const names = [];
  let recorded = null;
  await page.route((url) => url.origin === env.server.url && url.pathname !== '/' && !url.pathname.startsWith('/static/')
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

test('mentions: highlighted for everyone, strongly for the one named; names with spaces and "(2)", any case', { timeout: 60000 }, async () => {
  const room = `mention-${rand()}`;
  const alice = await join(env.browser, env.server.url, room, 'alice');
  const alice2 = await join(env.browser, env.server.url, room, 'alice');
  const mary = await join(env.browser, env.server.url, room, 'Mary Ann');
  const bob = await join(env.browser, env.server.url, room, 'bob');
  assert.equal(await alice2.page.textContent('#me-name'), 'alice (2)');

  const text = 'hi @ALICE (2), @mary ann and @Alice! mail bob@alice.org, not @alicex; see https://example.org/@alice';
  await say(bob.page, text);
  const carol = await join(env.browser, env.server.url, room, 'carol'); // sees it in the history
  const everyone = [alice, alice2, mary, bob, carol];
  for (const u of everyone) await waitForMessage(u.page, text);

  // The message is bob's last one (joined lines may come after it).
  const look = (page) => page.$$eval('#log .msg', (rows) => {
    const row = rows.at(-1);
    return {
      text: row.querySelector('.text').textContent,
      mentions: [...row.querySelectorAll('.text .mention')].map((m) => [m.textContent, m.dataset.name, m.tagName]),
      strong: [...row.querySelectorAll('.text .mention-me')].map((m) => m.textContent),
      rowMarked: row.classList.contains('mentions-me'),
      links: [...row.querySelectorAll('.text a')].map((a) => [a.textContent, a.querySelector('.mention') !== null]),
      said: row.querySelector('.meta').textContent.includes('(mentions you)'),
    };
  });
  const expected = { alice: ['@Alice'], 'alice (2)': ['@ALICE (2)'], 'Mary Ann': ['@mary ann'], bob: [], carol: [] };
  for (const u of everyone) {
    const me = await u.page.textContent('#me-name');
    const got = await look(u.page);
    assert.equal(got.text, text, 'the text is unchanged');
    assert.deepEqual(got.mentions, [
      ['@ALICE (2)', 'alice (2)', me === 'alice (2)' ? 'MARK' : 'SPAN'],
      ['@mary ann', 'Mary Ann', me === 'Mary Ann' ? 'MARK' : 'SPAN'],
      ['@Alice', 'alice', me === 'alice' ? 'MARK' : 'SPAN'],
    ], `${me}: every mention, and nothing in an e-mail address, a longer word or a link`);
    assert.deepEqual(got.strong, expected[me], `${me}: strong highlight`);
    assert.equal(got.rowMarked, expected[me].length > 0, `${me}: the row`);
    assert.equal(got.said, expected[me].length > 0, `${me}: "(mentions you)" for screen readers`);
    assert.deepEqual(got.links, [['https://example.org/@alice', false]]);
  }
  // The two kinds look different: a mention of you has a background, the others do not.
  const styles = await alice.page.$$eval('#log .msg', (rows) => {
    const row = rows.at(-1);
    const bg = (e) => getComputedStyle(e).backgroundColor;
    const mark = row.querySelector('.mention-me');
    return { me: bg(mark), other: bg(row.querySelector('.mention:not(.mention-me)')), row: bg(row),
      display: getComputedStyle(mark).display };
  });
  assert.notEqual(styles.me, styles.other);
  assert.equal(styles.display, 'inline', 'the mark stays in the line of text');
  assert.notEqual(styles.row, 'rgba(0, 0, 0, 0)');
  if (process.env.E2E_SCREENSHOT_DIR) {
    await alice.page.screenshot({ path: `${process.env.E2E_SCREENSHOT_DIR}/mentions.png` });
  }
  await closeAll(...everyone);
});

// Headless Chromium cannot show a desktop notification, so each page gets a test double
// around the browser's own Notification: it records every `new Notification(…)` and every
// requestPermission() call, then hands on to the real API (the permission itself stays the
// browser's, set by context.grantPermissions, unless `permission` stands in for a browser
// whose settings block the site). window.focus is recorded the same way.
function spyOnNotifications({ permission = null } = {}) {
  const Real = window.Notification;
  const spy = { created: [], asked: 0, focused: 0, last: null };
  window.notificationSpy = spy;
  class Recorded extends Real {
    constructor(title, options = {}) {
      super(title, options);
      spy.created.push({ title, body: options.body, tag: options.tag });
      spy.last = this;
    }
    static get permission() { return permission ?? Real.permission; }
    static requestPermission(...args) { spy.asked++; return Real.requestPermission(...args); }
  }
  window.Notification = Recorded;
  const focus = window.focus.bind(window);
  window.focus = () => { spy.focused++; focus(); };
}
const spied = (page) => page.evaluate(() => {
  const s = window.notificationSpy;
  return { created: s.created, asked: s.asked, focused: s.focused, permission: Notification.permission };
});
const titleIs = (page, title) => page.waitForFunction((t) => document.title === t, title);

test('no permission prompt on load; without the permission a hidden mention notifies nobody but marks the title', { timeout: 60000 }, async () => {
  const room = `quiet-${rand()}`;
  const context = await env.browser.newContext();
  await context.addInitScript(spyOnNotifications);
  const alice = await joinIn(context, env.server.url, room, 'alice');
  const bob = await join(env.browser, env.server.url, room, 'bob');
  await alice.page.reload();
  await waitConnected(alice.page);
  assert.deepEqual(await spied(alice.page), { created: [], asked: 0, focused: 0, permission: 'default' });
  assert.equal(await alice.page.textContent('#notify'), 'Notify me: off');
  assert.equal(await alice.page.getAttribute('#notify', 'aria-describedby'), 'notify-help');

  await setHidden(alice.page, true);
  await say(bob.page, 'no mention here');
  await titleIs(alice.page, `(1) #${room} · chatroom`);
  await say(bob.page, '@alice are you there?');
  await titleIs(alice.page, `(2•) #${room} · chatroom`);
  await say(bob.page, 'and one more');
  await titleIs(alice.page, `(3•) #${room} · chatroom`);
  assert.deepEqual((await spied(alice.page)).created, [], 'no notification without the permission and the setting');
  await setHidden(alice.page, false);
  assert.equal(await alice.page.title(), `#${room} · chatroom`);
  assert.deepEqual(await spied(alice.page), { created: [], asked: 0, focused: 0, permission: 'default' });
  await closeAll(alice, bob);
});

test('"Notify me" with the permission granted: a mention in a hidden tab notifies; clicking it focuses the tab; "off" is kept across a reload', { timeout: 60000 }, async () => {
  const room = `notify-${rand()}`;
  const context = await env.browser.newContext();
  await context.grantPermissions(['notifications'], { origin: env.server.url });
  await context.addInitScript(spyOnNotifications);
  const alice = await joinIn(context, env.server.url, room, 'Alice Smith');
  const bob = await join(env.browser, env.server.url, room, 'bob');
  const { page } = alice;
  // Granted, but not asked for: the page stays quiet until "Notify me" is clicked.
  assert.equal(await page.textContent('#notify'), 'Notify me: off');
  await page.getByRole('button', { name: 'Notify me: off' }).click();
  await page.waitForSelector('#notify[data-state="on"]');
  assert.equal(await page.textContent('#notify'), 'Notify me: on');

  // Visible tab: a mention is highlighted, nothing is notified.
  await say(bob.page, '@alice smith look here');
  await waitForMessage(page, '@alice smith look here');
  assert.deepEqual((await spied(page)).created, []);

  await setHidden(page, true);
  await say(bob.page, 'just chatting');
  await titleIs(page, `(1) #${room} · chatroom`);
  await say(bob.page, 'ping @Alice Smith, the build is green');
  await titleIs(page, `(2•) #${room} · chatroom`);
  const s = await spied(page);
  assert.equal(s.created.length, 1, JSON.stringify(s.created));
  assert.equal(s.created[0].title, `bob mentioned you in #${room}`);
  assert.equal(s.created[0].body, 'ping @Alice Smith, the build is green');
  assert.match(s.created[0].tag, new RegExp(`^chatroom/${room}/\\d+$`));
  // Clicking the notification brings the tab forward.
  await page.evaluate(() => window.notificationSpy.last.dispatchEvent(new Event('click')));
  assert.equal((await spied(page)).focused, 1);
  await setHidden(page, false);
  assert.equal(await page.title(), `#${room} · chatroom`);

  // Off, per browser: the setting outlives a reload, and a hidden mention then notifies nobody.
  await page.getByRole('button', { name: 'Notify me: on' }).click();
  await page.waitForSelector('#notify[data-state="off"]');
  await page.reload();
  await waitConnected(page);
  assert.equal(await page.textContent('#notify'), 'Notify me: off');
  await setHidden(page, true);
  await say(bob.page, '@ALICE SMITH still there?');
  await titleIs(page, `(1•) #${room} · chatroom`);
  await say(bob.page, 'end of test');
  await titleIs(page, `(2•) #${room} · chatroom`);
  assert.deepEqual(await spied(page), { created: [], asked: 0, focused: 0, permission: 'granted' });
  await closeAll(alice, bob);
});

test('"Notify me" in a env.browser that blocks notifications says so, and does not ask again', { timeout: 60000 }, async () => {
  const context = await env.browser.newContext();
  await context.addInitScript(spyOnNotifications, { permission: 'denied' });
  const alice = await joinIn(context, env.server.url, `blocked-${rand()}`, 'alice');
  const { page } = alice;
  assert.equal(await page.textContent('#notify'), 'Notify me: blocked');
  await page.click('#notify');
  await page.waitForSelector('#send-error:has-text("blocks notifications")');
  assert.equal(await page.textContent('#notify'), 'Notify me: blocked');
  assert.equal((await spied(page)).asked, 0);
  await closeAll(alice);
});
