// The live map in a real browser: starts `fleettracker serve` and `fleettracker simulate`, opens
// `GET /` in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core), and checks
// that drivers appear and move, that clicking one shows its details and trail, that the stream
// follows the viewport, and that with no tile server the page falls back to its coordinate grid.
// Saves a screenshot to tests/artifacts/map.png. Every wait is a poll against a deadline.
//
// Run: cargo build && (cd tests/browser && npm ci) && node --test tests/browser/
// FLEET_BIN names the binary (default: $CARGO_TARGET_DIR or target, then /debug/fleettracker);
// CHROMIUM_PATH the browser (default /usr/bin/chromium).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN =
  process.env.FLEET_BIN ??
  path.join(path.resolve(ROOT, process.env.CARGO_TARGET_DIR ?? 'target'), 'debug', 'fleettracker');
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const ARTIFACTS = path.join(ROOT, 'tests', 'artifacts');
/** The simulator's default city box is 31.13..31.33 N, 121.35..121.60 E. */
const CITY = { lat: 31.23, lon: 121.475, zoom: 12 };
const VIEWPORT = { width: 1280, height: 800 };

const children = [];
const cleanups = [];
let server;
let simulator;
let context;
let page;
let tiles;
const pageErrors = [];
let passed = false;

/** Polls `check` (which may be async) until it returns a truthy value, at most `ms`. */
async function until(what, ms, check) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last})`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Starts a process, keeping its output for failure messages. */
function start(args, options = {}) {
  const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], ...options });
  child.output = '';
  const keep = (chunk) => {
    child.output = (child.output + chunk).slice(-20000);
  };
  child.stdout.setEncoding('utf8').on('data', keep);
  child.stderr.setEncoding('utf8').on('data', keep);
  child.exited = new Promise((resolve) => child.once('exit', resolve));
  children.push(child);
  return child;
}

/** SIGTERM, then SIGKILL if it is still running after a few seconds. */
async function stop(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const exited = await Promise.race([
    child.exited.then(() => true),
    new Promise((resolve) => setTimeout(() => resolve(false), 5000)),
  ]);
  if (!exited) child.kill('SIGKILL');
}

// Whatever happens to the test process, no server or simulator outlives it.
process.on('exit', () => {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
});

/** A tile server that answers every request 503 and records the paths: "no tiles reachable". */
async function startDeadTileServer() {
  const requests = [];
  const srv = createServer((req, res) => {
    requests.push(req.url);
    res.writeHead(503, { 'content-type': 'text/plain' }).end('no tiles here');
  });
  await new Promise((resolve) => srv.listen(0, '127.0.0.1', resolve));
  return { srv, requests, url: `http://127.0.0.1:${srv.address().port}/{z}/{x}/{y}.png` };
}

before(async () => {
  assert.ok(existsSync(BIN), `${BIN} is missing: run \`cargo build\` first (or set FLEET_BIN)`);
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium`);

  tiles = await startDeadTileServer();
  cleanups.push(() => new Promise((resolve) => tiles.srv.close(resolve)));

  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'fleet-map-data-'));
  cleanups.push(() => rm(dataDir, { recursive: true, force: true }));
  server = start(['serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir, '--tile-url', tiles.url], {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' },
  });
  const base = await until('the server to print its address', 30000, () => {
    if (server.exitCode !== null) throw new Error(`server exited ${server.exitCode}: ${server.output}`);
    return server.output.match(/fleettracker listening on (http:\/\/\S+)/)?.[1];
  });
  server.base = base;

  simulator = start([
    'simulate',
    '--url', base,
    '--drivers', '50',
    '--interval', '300ms',
    '--duration', '20s',
    '--quiet',
  ]);

  const userDataDir = await mkdtemp(path.join(os.tmpdir(), 'fleet-map-chromium-'));
  cleanups.push(() => rm(userDataDir, { recursive: true, force: true }));
  // launchPersistentContext is how playwright takes a fresh --user-data-dir.
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
    viewport: VIEWPORT,
    timeout: 60000,
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on('pageerror', (error) => pageErrors.push(String(error)));
  page.on('console', (message) => {
    // Failed tile loads are expected here (the tile server answers 503); anything else is not.
    if (message.type() === 'error' && !/Failed to load resource/.test(message.text())) {
      pageErrors.push(`console: ${message.text()}`);
    }
  });
});

after(async () => {
  if (!passed && page && !page.isClosed()) {
    // On failure, the picture of what the page showed is the first thing to look at.
    await mkdir(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: path.join(ARTIFACTS, 'map-failure.png') }).catch(() => {});
  }
  if (!passed) {
    for (const child of [server, simulator]) {
      if (child) console.error(`--- ${child.spawnargs.slice(1, 2)} output ---\n${child.output}`);
    }
  }
  await context?.close().catch(() => {});
  await Promise.all(children.map(stop));
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
});

const map = (fn, arg) => page.evaluate(fn, arg);

test('the live map shows drivers moving, their details and trail, and follows the viewport', { timeout: 180000 }, async () => {
  // The page and its configuration.
  const config = await (await fetch(`${server.base}/map/config.json`)).json();
  assert.equal(config.tile_url, tiles.url);

  const response = await page.goto(`${server.base}/?lat=${CITY.lat}&lon=${CITY.lon}&zoom=${CITY.zoom}`);
  assert.equal(response.status(), 200);
  assert.match(response.headers()['content-type'], /^text\/html/);
  assert.equal(await page.title(), 'FleetTracker · Live map');

  await until('the stream to be live', 20000, () => map(() => window.fleetMap?.connection() === 'live'));

  // Drivers appear (from the snapshot or from live positions)...
  const count = await until('at least 10 drivers on the map', 30000, async () => {
    const n = await map(() => window.fleetMap.driverCount());
    return n >= 10 && n;
  });
  assert.ok(count <= 50, `at most the 50 simulated drivers, got ${count}`);

  // ...and move.
  const ids = (await map(() => window.fleetMap.driverIds())).slice(0, 10);
  const before = await map((ids) => window.fleetMap.positionsOf(ids), ids);
  const moved = await until('a driver to move', 15000, async () => {
    const now = await map((ids) => window.fleetMap.positionsOf(ids), ids);
    return ids.find(
      (id) => now[id] && before[id] && (now[id].latitude !== before[id].latitude || now[id].longitude !== before[id].longitude),
    );
  });
  assert.ok(moved);

  // The side panel counts what is in view and measures the update rate.
  await until('in-view counts in the panel', 5000, async () => Number((await page.textContent('#view-total')).replace(/\D/g, '')) > 0);
  await until('a positive update rate', 10000, async () => Number.parseFloat(await page.textContent('#rate')) > 0);
  await until('fleet-wide counts from /v1/stats', 10000, async () => /^\d/.test(await page.textContent('#fleet-total')));

  // With no tile server answering, the page says so and draws its grid; the tiles were asked for
  // from the --tile-url template.
  await until('the tile fallback', 15000, () => map(() => window.fleetMap.tiles() === 'unavailable'));
  assert.ok(await page.isVisible('#tiles-note'));
  assert.ok(
    tiles.requests.some((url) => /^\/12\/\d+\/\d+\.png$/.test(url)),
    `tile requests: ${tiles.requests.slice(0, 5).join(' ')}`,
  );

  // A click on a driver opens its card with its id, status and trail.
  const target = await until('a driver well inside the map to click', 10000, async () => {
    const ids = await map(() => window.fleetMap.driverIds());
    for (const id of ids) {
      const p = await map((id) => window.fleetMap.screenPointOf(id), id);
      // Clear of the side panel, the zoom buttons and the bottom overlays.
      if (p && p.x > 420 && p.x < VIEWPORT.width - 80 && p.y > 80 && p.y < VIEWPORT.height - 60) return { id, p };
    }
    return null;
  });
  await until(`the card of ${target.id} after a click`, 10000, async () => {
    if ((await map(() => window.fleetMap.selected())) !== target.id) {
      const p = await map((id) => window.fleetMap.screenPointOf(id), target.id);
      if (p) await page.mouse.click(p.x, p.y);
    }
    return (await page.isVisible('#driver-card')) && (await page.textContent('#driver-id')) === target.id;
  });
  assert.match(await page.textContent('#driver-status'), /^(online|busy)$/);
  assert.match(await page.textContent('#driver-updated'), /\d\d:\d\d:\d\d/);
  const trail = await until('the trail to load', 15000, async () => {
    const t = await map(() => window.fleetMap.trail());
    return t && t.state !== 'loading' && t;
  });
  assert.equal(trail.state, 'ok', `trail ${JSON.stringify(trail)}: ${await page.textContent('#trail-note')}`);
  assert.ok(trail.points >= 1);
  assert.match(await page.textContent('#trail-note'), /^Trail: \d+(\.\d)?\s(m|km) in the last 15 min \(\d+ points?\)$/);
  // Let the trail grow a little with live positions, then take the picture.
  await until('the trail to grow live', 10000, async () => (await map(() => window.fleetMap.trail())).points > trail.points);

  await mkdir(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, 'map.png') });

  // A close-up of the selected driver and its trail.
  const at = (await map((ids) => window.fleetMap.positionsOf(ids), [target.id]))[target.id];
  await map(({ latitude, longitude }) => window.fleetMap.setView(latitude, longitude, 17), at);
  // Best effort: a longer trail makes a better picture, but the simulator may be ending.
  const grown = (await map(() => window.fleetMap.trail())).points + 15;
  await until('the trail to grow', 6000, async () => (await map(() => window.fleetMap.trail())).points >= grown).catch(() => {});
  await page.screenshot({ path: path.join(ARTIFACTS, 'map-driver.png') });
  await map(({ lat, lon, zoom }) => window.fleetMap.setView(lat, lon, zoom), CITY);

  // The subscription follows the viewport: dragging the map re-subscribes to the new box...
  const bboxBefore = await map(() => window.fleetMap.subscribedBbox());
  const snapshotsBefore = await map(() => window.fleetMap.snapshots());
  await page.mouse.move(800, 400);
  await page.mouse.down();
  for (let i = 1; i <= 10; i++) await page.mouse.move(800 - i * 30, 400 - i * 10);
  await page.mouse.up();
  await until('a new snapshot after the drag', 10000, () => map((n) => window.fleetMap.snapshots() > n, snapshotsBefore));
  assert.notDeepEqual(await map(() => window.fleetMap.subscribedBbox()), bboxBefore);
  // ...an empty area shows nobody...
  await map(() => window.fleetMap.setView(31.23, 123.5, 12));
  await until('an empty map far from the city', 10000, () => map(() => window.fleetMap.driverCount() === 0));
  // ...and the city again shows its drivers.
  await map(({ lat, lon, zoom }) => window.fleetMap.setView(lat, lon, zoom), CITY);
  await until('the drivers back after returning', 10000, () => map(() => window.fleetMap.driverCount() >= 10));

  // Zoomed far out the page stops streaming instead of asking for a continent's drivers.
  await map(() => window.fleetMap.setView(31.23, 121.475, 5));
  await until('the stream to pause when zoomed out', 10000, () => map(() => window.fleetMap.connection() === 'paused'));

  assert.deepEqual(pageErrors, [], 'no uncaught errors, CSP violations or console errors in the page');
  passed = true;
});
