// House rules for static/, checked on the files themselves (no browser needed).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { ROOT } from './helpers.mjs';

const dir = path.join(ROOT, 'static');
const files = readdirSync(dir).map((f) => [f, readFileSync(path.join(dir, f), 'utf8')]);

test('no HTML sinks in scripts: text goes in with textContent and createTextNode', () => {
  for (const [f, src] of files.filter(([f]) => f.endsWith('.js'))) {
    assert.doesNotMatch(src, /innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function/, f);
  }
});

test('HTML works under the CSP: no inline script or style, nothing from other origins', () => {
  for (const [f, src] of files.filter(([f]) => f.endsWith('.html'))) {
    assert.doesNotMatch(src, /<script(?![^>]*\ssrc=)[^>]*>/i, `${f}: inline <script>`);
    assert.doesNotMatch(src, /<style|\sstyle=|\son[a-z]+=/i, `${f}: inline style or handler`);
    assert.doesNotMatch(src, /(src|href)="(https?:)?\/\//i, `${f}: resource from another origin`);
  }
});

test('index.html has the three placeholders in meta tags; 404.html has none and explains the rule', () => {
  const index = files.find(([f]) => f === 'index.html')[1];
  for (const m of ['chatroom-room" content="{{ROOM}}"', 'chatroom-ws-url" content="{{WS_URL}}"', 'chatroom-ws-port" content="{{WS_PORT}}"']) {
    assert.ok(index.includes(m), m);
  }
  const notFound = files.find(([f]) => f === '404.html')[1];
  assert.doesNotMatch(notFound, /\{\{/);
  assert.match(notFound, /1 to 64/);
  assert.match(notFound, /href="\/"/);
});
