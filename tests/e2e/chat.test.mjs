// End-to-end: the real server binary and the page in headless Chromium.
// Every wait is on page state (selectors, DOM predicates), never a fixed sleep.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { serverAndBrowser, join, say, waitForMessage, messages, events, rand, waitForText } from './helpers.mjs';

const env = serverAndBrowser();
const opened = [];

async function user(room, name, opts) {
  const u = await join(env.browser, env.server.url, room, name, opts);
  opened.push(u);
  return u;
}
async function closeAll(...users) {
  for (const u of users) {
    assert.deepEqual(u.errors, [], `page errors for ${u.name}`);
    await u.context.close();
  }
}

test('two users in /room2 chat both ways; a user at / sees none of it', { timeout: 45000 }, async () => {
  const alice = await user('room2', 'alice');
  const bob = await user('room2', 'bob');
  const carol = await user('', 'carol');
  const dave = await user('', 'dave');

  await say(alice.page, 'hello bob, from alice');
  await waitForMessage(bob.page, 'hello bob, from alice');
  await say(bob.page, 'hi alice!');
  await waitForMessage(alice.page, 'hi alice!');
  await waitForMessage(bob.page, 'hi alice!');

  for (const u of [alice, bob]) {
    const ms = await messages(u.page);
    assert.deepEqual(ms.map((m) => [m.name, m.text]), [['alice', 'hello bob, from alice'], ['bob', 'hi alice!']]);
    assert.deepEqual(ms.map((m) => m.own), [u === alice, u === bob], 'own messages are marked');
    assert.ok(ms[0].id < ms[1].id);
  }
  assert.equal(await alice.page.textContent('#room-name'), 'room2');
  assert.equal(await carol.page.textContent('#room-name'), 'general');

  // Sentinel: after the room2 messages, someone at / speaks; carol's last message must be that.
  const marker = `marker-${rand()}`;
  await say(dave.page, marker);
  await waitForMessage(carol.page, marker);
  const seen = await messages(carol.page);
  assert.equal(seen.at(-1).text, marker);
  assert.ok(seen.every((m) => !['alice', 'bob'].includes(m.name)), JSON.stringify(seen));
  assert.ok(!(await carol.page.textContent('#log')).includes('alice'));
  const people = await carol.page.$$eval('#people-list li', (li) => li.map((x) => x.firstChild.textContent));
  assert.deepEqual(people.sort(), ['carol', 'dave']);
  await closeAll(alice, bob, carol, dave);
});

test('online list, typing indicator, joined and left lines', { timeout: 45000 }, async () => {
  const room = `presence-${rand()}`;
  const alice = await user(room, 'alice');
  await alice.page.waitForSelector('#people-count:text-is("1")');
  const bob = await user(room, 'bob');

  await alice.page.waitForSelector('#people-count:text-is("2")');
  await alice.page.waitForSelector('#people-list li:has-text("bob")');
  await alice.page.waitForSelector('#log .event:text("bob joined")');
  assert.deepEqual(await bob.page.$$eval('#people-list li', (l) => l.map((x) => x.textContent).sort()),
    ['alice', 'bob (you)']);

  // bob types: alice sees it, then it goes away by itself 3 s after the last typing event
  // (the waits' default 30 s is ten times that).
  await bob.page.click('#input');
  await bob.page.keyboard.type('hel');
  await waitForText(alice.page, '#typing', 'bob is typing…');
  await alice.page.waitForFunction(() => document.querySelector('#typing').textContent === '');
  // Typing again, then sending: the indicator clears with the message.
  await bob.page.keyboard.type('lo');
  await waitForText(alice.page, '#typing', 'bob is typing…');
  await bob.page.keyboard.press('Enter');
  await waitForMessage(alice.page, 'hello');
  assert.equal(await alice.page.textContent('#typing'), '');

  // The second message from bob is grouped under the first.
  await say(bob.page, 'second line from bob');
  await waitForMessage(alice.page, 'second line from bob');
  assert.equal(await alice.page.$eval('#log .msg:last-child', (r) => r.classList.contains('cont')), true);

  await closeAll(bob);
  await alice.page.waitForSelector('#log .event:text("bob left")');
  await alice.page.waitForSelector('#people-count:text-is("1")');
  assert.deepEqual(await events(alice.page), ['bob joined', 'bob left']);
  await closeAll(alice);
});

test('HTML in messages and names stays literal text; no dialog opens', { timeout: 45000 }, async () => {
  const room = `xss-${rand()}`;
  const evilName = '<img src=y onerror=alert(2)>';
  const alice = await user(room, evilName);
  const bob = await user(room, 'bob');
  const dialogs = [];
  for (const u of [alice, bob]) {
    u.page.on('dialog', (d) => { dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  }
  const payloads = ['<img src=x onerror=alert(1)>', '<script>alert(1)</script>', '<a href="javascript:alert(3)">x</a>'];
  for (const p of payloads) await say(alice.page, p);
  const marker = `done-${rand()}`;
  await say(alice.page, marker);
  await waitForMessage(bob.page, marker);
  await waitForMessage(alice.page, marker);

  for (const u of [alice, bob]) {
    const ms = await messages(u.page);
    assert.deepEqual(ms.map((m) => m.text), [...payloads, marker]);
    assert.ok(ms.every((m) => m.name === evilName));
    assert.equal(await u.page.$$eval('#log img, #log script, #log a, #people-list img', (x) => x.length), 0);
  }
  assert.deepEqual(await bob.page.$$eval('#people-list li', (l) => l.map((x) => x.firstChild.textContent).sort()),
    [evilName, 'bob'].sort());
  assert.deepEqual(dialogs, []);
  await closeAll(alice, bob);
});

test('links open safely; multi-line messages keep their line breaks', { timeout: 45000 }, async () => {
  const room = `links-${rand()}`;
  const alice = await user(room, 'alice');
  const bob = await user(room, 'bob');
  await alice.page.click('#input');
  await alice.page.keyboard.type('first line');
  await alice.page.keyboard.press('Shift+Enter');
  await alice.page.keyboard.type('see https://example.org/a?b=1. and (http://example.com/x)');
  assert.equal(await alice.page.inputValue('#input'), 'first line\nsee https://example.org/a?b=1. and (http://example.com/x)');
  await alice.page.keyboard.press('Enter');
  const text = 'first line\nsee https://example.org/a?b=1. and (http://example.com/x)';
  await waitForMessage(bob.page, text);
  assert.equal(await alice.page.inputValue('#input'), '');
  const links = await bob.page.$$eval('#log .msg .text a', (as) => as.map((a) => ({
    href: a.getAttribute('href'), text: a.textContent, rel: a.rel, target: a.target,
  })));
  assert.deepEqual(links, [
    { href: 'https://example.org/a?b=1', text: 'https://example.org/a?b=1', rel: 'noopener noreferrer', target: '_blank' },
    { href: 'http://example.com/x', text: 'http://example.com/x', rel: 'noopener noreferrer', target: '_blank' },
  ]);
  // Two rendered lines: pre-wrap keeps the newline.
  const lines = await bob.page.$eval('#log .msg:last-child .text', (t) => {
    const lh = parseFloat(getComputedStyle(t).lineHeight);
    return { ws: getComputedStyle(t).whiteSpace, lines: Math.round(t.getBoundingClientRect().height / lh) };
  });
  assert.equal(lines.ws, 'pre-wrap');
  assert.equal(lines.lines, 2);
  await closeAll(alice, bob);
});

test('at 360 px wide: the input and the last message are in view, no horizontal scroll', { timeout: 45000 }, async () => {
  const room = `narrow-${rand()}`;
  const phone = await user(room, 'phone-user-with-a-long-name-xy', { viewport: { width: 360, height: 740 } });
  const desk = await user(room, 'desk');
  const long = [
    'x'.repeat(300),
    `https://example.org/${'very-long-path/'.repeat(20)}`,
    'a normal sentence that wraps over several lines on a narrow phone screen, as chat messages do',
  ];
  for (let i = 0; i < 12; i++) await say(desk.page, `filler message ${i}`);
  for (const t of long) await say(desk.page, t);
  await waitForMessage(phone.page, long.at(-1));

  const m = await phone.page.evaluate(() => {
    const s = document.scrollingElement;
    const box = (sel) => { const r = document.querySelector(sel).getBoundingClientRect(); return { l: r.left, r: r.right, t: r.top, b: r.bottom }; };
    return {
      sw: s.scrollWidth, cw: s.clientWidth, bodySw: document.body.scrollWidth,
      vw: innerWidth, vh: innerHeight, input: box('#input'), last: box('#log .msg:last-child'),
      logSw: document.querySelector('#log').scrollWidth, logCw: document.querySelector('#log').clientWidth,
    };
  });
  assert.ok(m.sw <= m.cw, `page scrolls sideways: ${JSON.stringify(m)}`);
  assert.ok(m.logSw <= m.logCw, `log scrolls sideways: ${JSON.stringify(m)}`);
  for (const [what, b] of [['input', m.input], ['last message', m.last]]) {
    assert.ok(b.l >= 0 && b.r <= m.vw && b.t >= 0 && b.b <= m.vh, `${what} out of view: ${JSON.stringify(m)}`);
  }
  await closeAll(phone, desk);
});

test('keyboard only: Tab reaches the input, Enter sends', { timeout: 45000 }, async () => {
  const room = `keys-${rand()}`;
  const alice = await user(room, 'alice');
  const bob = await user(room, 'bob');
  // Start again from a fresh load (the name is remembered) with nothing focused.
  await alice.page.reload();
  await alice.page.waitForSelector('#status[data-state="connected"]');
  let focused = '';
  for (let i = 0; i < 25 && focused !== 'input'; i++) {
    await alice.page.keyboard.press('Tab');
    focused = await alice.page.evaluate(() => {
      const a = document.activeElement;
      // Every stop on the way must show where focus is.
      if (a !== document.body && getComputedStyle(a).outlineStyle === 'none') throw new Error(`no focus ring on #${a.id || a.tagName}`);
      return a.id;
    });
  }
  assert.equal(focused, 'input');
  await alice.page.keyboard.type('typed with the keyboard alone');
  await alice.page.keyboard.press('Enter');
  await waitForMessage(bob.page, 'typed with the keyboard alone');
  await waitForMessage(alice.page, 'typed with the keyboard alone');
  await closeAll(alice, bob);
});

test('header: bad room names are explained, good ones navigate; the 404 page explains the rule', { timeout: 45000 }, async () => {
  const alice = await user(`hdr-${rand()}`, 'alice');
  const { page } = alice;
  for (const [input, expect] of [['static', 'reserved'], ['bad name!', '1–64'], ['x'.repeat(65), '1–64']]) {
    await page.fill('#goto-input', input);
    await page.press('#goto-input', 'Enter');
    await page.waitForSelector(`#goto-error:visible:has-text("${expect}")`);
  }
  await page.fill('#goto-input', '/Other-Room');
  await Promise.all([page.waitForURL(`${env.server.url}/other-room`), page.press('#goto-input', 'Enter')]);
  await page.waitForSelector('#status[data-state="connected"]');
  assert.equal(await page.textContent('#room-name'), 'other-room');
  assert.equal(await page.title(), '#other-room · chatroom');

  const res = await page.goto(`${env.server.url}/not%20a%20room`);
  assert.equal(res.status(), 404);
  const body = await page.textContent('body');
  assert.match(body, /1 to 64/);
  assert.match(body, /healthz/);
  await page.click('text=Go to the general room');
  await page.waitForSelector('#status[data-state="connected"]');
  assert.equal(await page.textContent('#room-name'), 'general');
  await closeAll(alice);
});

test('scrolled up: a "new messages" button instead of a jump; unread count in a hidden tab\'s title', { timeout: 45000 }, async () => {
  const room = `scroll-${rand()}`;
  const alice = await user(room, 'alice', { viewport: { width: 800, height: 500 } });
  const bob = await user(room, 'bob');
  for (let i = 0; i < 25; i++) await say(bob.page, `message ${i}`);
  await waitForMessage(alice.page, 'message 24');
  // At the bottom, new messages keep the view at the bottom.
  const atBottom = () => alice.page.$eval('#log', (l) => l.scrollHeight - l.scrollTop - l.clientHeight < 2);
  assert.equal(await atBottom(), true);

  await alice.page.$eval('#log', (l) => { l.scrollTop = 0; });
  await say(bob.page, 'while alice reads old messages');
  await alice.page.waitForSelector('#new-messages:visible:text-is("1 new message ↓")');
  await waitForMessage(alice.page, 'while alice reads old messages');
  assert.equal(await alice.page.$eval('#log', (l) => l.scrollTop), 0, 'did not jump');
  await alice.page.click('#new-messages');
  assert.equal(await atBottom(), true);
  assert.equal(await alice.page.isVisible('#new-messages'), false);

  // A hidden tab counts unread messages in its title (the test stands in for the browser's visibility).
  const setHidden = (h) => alice.page.evaluate((hidden) => {
    Object.defineProperty(document, 'hidden', { configurable: true, get: () => hidden });
    document.dispatchEvent(new Event('visibilitychange'));
  }, h);
  await setHidden(true);
  await say(bob.page, 'unread 1');
  await say(bob.page, 'unread 2');
  await alice.page.waitForFunction(() => document.title === `(2) #${location.pathname.slice(1)} · chatroom`);
  await setHidden(false);
  assert.equal(await alice.page.title(), `#${room} · chatroom`);
  await closeAll(alice, bob);
});

test('a dropped connection resumes with since + epoch: nothing missed, nothing twice', { timeout: 45000 }, async () => {
  const room = `resume-${rand()}`;
  const bob = await user(room, 'bob');
  // alice's WebSocket goes through a test-controlled relay, so the test can cut it.
  const context = await env.browser.newContext();
  let cut = false; // while true, new connections are closed at once
  let link = null;
  const sent = []; // frames alice's page sent, parsed
  const hist = []; // welcome.history ids alice received, per welcome
  await context.routeWebSocket(/\/ws\//, (page) => {
    if (cut) { page.close({ code: 4000, reason: 'test: network down' }); return; }
    const srv = page.connectToServer();
    page.onMessage((m) => { sent.push(JSON.parse(m)); srv.send(m); });
    srv.onMessage((m) => {
      const f = JSON.parse(m);
      if (f.type === 'welcome') hist.push(f.history.map((x) => x.id));
      page.send(m);
    });
    link = { page, srv };
  });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(`${env.server.url}/${room}`);
  await page.fill('#name-input', 'alice');
  await page.press('#name-input', 'Enter');
  await page.waitForSelector('#status[data-state="connected"]');
  await say(page, 'm1');
  await waitForMessage(page, 'm1');
  await say(bob.page, 'm2');
  await waitForMessage(page, 'm2');

  cut = true;
  link.page.close({ code: 4000, reason: 'test: network down' });
  link.srv.close();
  await page.waitForSelector('#status[data-state="reconnecting"]');
  await bob.page.waitForSelector('#log .event:text("alice left")');
  await say(bob.page, 'm3 while alice is away');
  await say(bob.page, 'm4 while alice is away');
  await waitForMessage(bob.page, 'm4 while alice is away');
  cut = false;
  await waitForMessage(page, 'm4 while alice is away', 20000);

  const ms = await messages(page);
  assert.deepEqual(ms.map((m) => m.text), ['m1', 'm2', 'm3 while alice is away', 'm4 while alice is away']);
  const hellos = sent.filter((f) => f.type === 'hello');
  assert.equal(hellos[0].since, undefined);
  const last = hellos.at(-1);
  assert.equal(last.since, ms[1].id, 'resumed after the last id seen');
  assert.equal(typeof last.epoch, 'string');
  assert.equal(last.session, hellos[0].session, 'same env.browser, same session');
  assert.deepEqual(hist.at(-1), [ms[2].id, ms[3].id], 'the env.server sent only what was missed');
  assert.deepEqual(errors, []);
  await context.close();
  await closeAll(bob);
});

test('changing the name reconnects with the new name and keeps the conversation', { timeout: 45000 }, async () => {
  const room = `rename-${rand()}`;
  const alice = await user(room, 'alice');
  const bob = await user(room, 'bob');
  await say(alice.page, 'hi from alice');
  await waitForMessage(bob.page, 'hi from alice');
  await alice.page.click('#change-name');
  await alice.page.fill('#name-input', 'alicia');
  await alice.page.press('#name-input', 'Enter');
  await alice.page.waitForSelector('#me-name:text-is("alicia")');
  await alice.page.waitForSelector('#status[data-state="connected"]');
  // alice's old connection leaves and her new one joins: the server may see them in either
  // order, so wait for the list they end in.
  await bob.page.waitForFunction(() => [...document.querySelectorAll('#people-list li')]
    .map((x) => x.textContent).sort().join('|') === 'alicia|bob (you)');
  await say(alice.page, 'now I am alicia');
  await waitForMessage(bob.page, 'now I am alicia');
  await waitForMessage(alice.page, 'now I am alicia');
  const ms = await messages(alice.page);
  assert.deepEqual(ms.map((m) => [m.name, m.text, m.own]), [['alice', 'hi from alice', true], ['alicia', 'now I am alicia', true]]);
  // Remembered: a reload joins as alicia without asking.
  await alice.page.reload();
  await alice.page.waitForSelector('#status[data-state="connected"]');
  assert.equal(await alice.page.textContent('#me-name'), 'alicia');
  await closeAll(alice, bob);
});

test('the character counter appears near 4000 code points; too long is refused in the page', { timeout: 45000 }, async () => {
  const alice = await user(`count-${rand()}`, 'alice');
  const { page } = alice;
  await page.fill('#input', 'short');
  assert.equal(await page.textContent('#counter'), '');
  await page.fill('#input', '😀'.repeat(3600)); // 3600 code points, 7200 UTF-16 units
  assert.equal(await page.textContent('#counter'), '3600 / 4000');
  const tooLong = 'a'.repeat(4001);
  await page.fill('#input', tooLong);
  assert.equal(await page.textContent('#counter'), '4001 / 4000');
  assert.equal(await page.$eval('#counter', (c) => c.classList.contains('over')), true);
  await page.press('#input', 'Enter');
  await page.waitForSelector('#send-error:has-text("too long")');
  assert.equal(await page.inputValue('#input'), tooLong);
  // Exactly 4000 emoji is allowed and arrives whole.
  await say(page, '😀'.repeat(4000));
  await waitForMessage(page, '😀'.repeat(4000));
  await closeAll(alice);
});

test('right-to-left names and a direction override in a message cannot reorder the text around them', { timeout: 45000 }, async () => {
  const room = `bidi-${rand()}`;
  const bob = await user(room, 'bob');
  // An Arabic name: without an isolate, the neutral text after it (" joined", the time) is
  // pulled into its right-to-left run and drawn on the wrong side of it.
  const arabic = 'علي';
  const alice = await user(room, arabic);
  await bob.page.waitForFunction((want) => [...document.querySelectorAll('#log .event')]
    .some((r) => r.textContent.startsWith(want)), `${arabic} joined · `);
  // U+202E (right-to-left override) inside a message must stay inside the message.
  const override = '\u202Eevil · 02:43 AM';
  await say(alice.page, override);
  await waitForMessage(bob.page, override);
  const layout = await bob.page.$eval('#log .msg:last-of-type', (row) => {
    const who = row.querySelector('.who');
    return {
      whoRight: who.getBoundingClientRect().right,
      timeLeft: row.querySelector('time').getBoundingClientRect().left,
      whoBidi: getComputedStyle(who).unicodeBidi,
      textBidi: getComputedStyle(row.querySelector('.text')).unicodeBidi,
    };
  });
  assert.equal(layout.whoBidi, 'isolate');
  assert.equal(layout.textBidi, 'isolate');
  assert.ok(layout.timeLeft >= layout.whoRight, `the time is drawn left of the name: ${JSON.stringify(layout)}`);
  // The joined line: the name in a <bdi>, and " joined" drawn after it (to its right).
  const line = await bob.page.$$eval('#log .event', (rows) => {
    const row = rows.find((r) => r.querySelector('bdi'));
    const bdi = row.querySelector('bdi');
    const range = document.createRange();
    range.selectNode(bdi.nextSibling);
    return { name: bdi.textContent, bdiRight: bdi.getBoundingClientRect().right, after: bdi.nextSibling.textContent,
      afterLeft: range.getBoundingClientRect().left };
  });
  assert.equal(line.name, arabic);
  assert.equal(line.after, ' joined');
  assert.ok(line.afterLeft >= line.bdiRight - 1, `" joined" is drawn left of the name: ${JSON.stringify(line)}`);
  if (process.env.E2E_SCREENSHOT_DIR) {
    await bob.page.screenshot({ path: `${process.env.E2E_SCREENSHOT_DIR}/bidi.png` });
  }
  await closeAll(alice, bob);
});
