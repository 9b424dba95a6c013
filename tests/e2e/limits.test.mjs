// End-to-end: how the page behaves when the server refuses things (full server, rate limit).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, join, say, waitForMessage, waitForHealth, messages, outbox } from './helpers.mjs';

const servers = [];
let browser;
after(async () => {
  await browser?.close();
  for (const s of servers) await s.stop();
});
async function setup(extra) {
  const s = await startServer({ extra });
  servers.push(s);
  browser ??= await launchBrowser();
  return s;
}

test('a full server: the page stops retrying, says so, and "Try again" works later', { timeout: 120000 }, async () => {
  const server = await setup(['--max-clients', '1']);
  const alice = await join(browser, server.url, 'full', 'alice');
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${server.url}/full`);
  await page.fill('#name-input', 'bob');
  await page.press('#name-input', 'Enter');
  // Each refused handshake (503) is retried with backoff; after five (about 4 s of backoff at
  // most) the page gives up. 60 s leaves a loaded machine ten times that.
  await page.waitForSelector('#status[data-state="stopped"]:has-text("refusing")', { timeout: 60000 });
  await page.waitForSelector('#retry:visible');
  // Said while refused: kept as "sending…", sent by itself once a connection is let in.
  await say(page, 'kept while refused');
  assert.deepEqual(await outbox(page), [{ text: 'kept while refused', state: 'sending' }]);

  await alice.context.close();
  // Once the server has let alice's place go, one retry is enough.
  await waitForHealth(server, (h) => h.clients === 0);
  await page.click('#retry');
  await page.waitForSelector('#status[data-state="connected"]', { timeout: 15000 });
  await waitForMessage(page, 'kept while refused');
  assert.deepEqual(await outbox(page), []);
  await context.close();
});

test('rate limited: the error is shown in words and the refused text comes back', { timeout: 45000 }, async () => {
  // A burst of 2 and then one message per 100 s: the third is refused however slow the machine.
  const server = await setup(['--rate-limit', '2:0.01']);
  const alice = await join(browser, server.url, 'limited', 'alice');
  // Three messages typed and sent in one burst, as a fast typist or a paste would. The refusal
  // of the third is sent by alice's own connection thread and usually overtakes the echoes of
  // the first two, which go through the room: the page must still give back "three".
  await alice.page.evaluate(() => {
    const input = document.querySelector('#input');
    for (const text of ['one', 'two', 'three']) {
      input.value = text;
      input.dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter', bubbles: true, cancelable: true }));
    }
  });
  await alice.page.waitForSelector('#send-error:has-text("too fast")');
  await waitForMessage(alice.page, 'two');
  // The refused text is back in the box (never silently dropped), ready to send again.
  await alice.page.waitForFunction(() => document.querySelector('#input').value === 'three');
  assert.deepEqual((await messages(alice.page)).map((m) => m.text), ['one', 'two']);
  // Its row stays, marked as not sent; the two that went through are no longer pending.
  await alice.page.waitForFunction(() => document.querySelectorAll('#log .out').length === 1);
  assert.deepEqual(await outbox(alice.page), [{ text: 'three', state: 'failed' }]);
  assert.equal(await alice.page.textContent('#log .out .out-state'), 'not sent (too fast)');

  // Refused while the next message is being typed: it goes back above the draft, not lost.
  await alice.page.evaluate(() => {
    const input = document.querySelector('#input');
    input.value = 'four';
    input.dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter', bubbles: true, cancelable: true }));
    input.value = 'a draft';
  });
  await alice.page.waitForFunction(() => document.querySelector('#input').value === 'four\na draft');
  assert.deepEqual((await messages(alice.page)).map((m) => m.text), ['one', 'two']);
  // Sending again cleared the old refusal; "four" is the one not sent now. Dismiss takes it away.
  assert.deepEqual(await outbox(alice.page), [{ text: 'four', state: 'failed' }]);
  await alice.page.click('#log .out button:text-is("Dismiss")');
  assert.deepEqual(await outbox(alice.page), []);
  assert.equal(await alice.page.evaluate(() => document.activeElement.id), 'input');
  await alice.context.close();
});
