// Screenshots of a room with a few messages from two users (bob mentions alice, whose page is
// shot: the strong mention highlight; alice mentions bob: the plain one): desktop 1280×800 and phone 360×740,
// light and dark. Writes tests/e2e/out/{desktop,phone}-{light,dark}.png, and out/readme.png
// (1000×600, light) for docs/screenshot.png.
// Run: node screenshots.mjs   (after `cargo build`; CHATROOM_BIN and CHROMIUM override the paths)
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { startServer, launchBrowser, join, say, waitForMessage, waitForText } from './helpers.mjs';

const out = path.join(import.meta.dirname, 'out');
await mkdir(out, { recursive: true });
const server = await startServer();
const browser = await launchBrowser();
try {
  const alice = await join(browser, server.url, 'design-team', 'alice');
  const bob = await join(browser, server.url, 'design-team', 'bob');
  const script = [
    [bob, 'Morning! Did the new build go out?'],
    [alice, 'Yes, about ten minutes ago.'],
    [alice, 'Release notes: https://example.org/releases/0.4'],
    [bob, 'Great, @alice. Two things I noticed:\n1. the header wraps nicely on my phone\n2. dark mode follows the system now'],
    [alice, 'Nice, thanks for checking @bob!'],
  ];
  for (const [u, text] of script) {
    await say(u.page, text);
    await waitForMessage(alice.page, text);
  }
  await bob.page.click('#input');
  await alice.page.fill('#input', 'Sounds good, let');
  // bob keeps typing (the page sends at most one typing event per 2 s) until alice sees it.
  const bobTyping = async () => {
    for (let i = 0; i < 40; i++) {
      await bob.page.keyboard.type('.');
      if (await alice.page.textContent('#typing') === 'bob is typing…') return;
      await waitForText(alice.page, '#typing', 'bob is typing…', 500).catch(() => {});
    }
    throw new Error('alice never saw bob typing');
  };

  for (const [device, viewport] of [['desktop', { width: 1280, height: 800 }], ['phone', { width: 360, height: 740 }]]) {
    for (const colorScheme of ['light', 'dark']) {
      await alice.page.setViewportSize(viewport);
      await alice.page.emulateMedia({ colorScheme });
      // Keep bob's typing indicator alive for the shot.
      await bobTyping();
      const file = path.join(out, `${device}-${colorScheme}.png`);
      await alice.page.screenshot({ path: file });
      console.log(`wrote ${file}`);
    }
  }
  // The README's picture (docs/screenshot.png): desktop, light, 1000 px wide to stay small.
  await alice.page.setViewportSize({ width: 1000, height: 600 });
  await alice.page.emulateMedia({ colorScheme: 'light' });
  await bobTyping();
  await alice.page.screenshot({ path: path.join(out, 'readme.png') });
  console.log(`wrote ${path.join(out, 'readme.png')} (copy it to docs/screenshot.png)`);
} finally {
  await browser.close();
  await server.stop();
}
