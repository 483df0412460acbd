// FleetTracker live map: drivers of the visible area on a Web Mercator canvas, following them over
// the `/v1/stream` WebSocket. No framework, no build step: served as is by the binary.
'use strict';

(() => {
  const TILE = 256;
  const MIN_ZOOM = 2;
  const MAX_ZOOM = 19;
  /** Below this zoom the visible area is too large to stream every driver in it. */
  const LIVE_MIN_ZOOM = 8;
  const MAX_LAT = 85.0511287798;
  /** The simulator's default city (`fleettracker simulate --city`). */
  const DEFAULT_VIEW = { lat: 31.23, lon: 121.475, zoom: 12 };
  const COLORS = { online: '#16a34a', busy: '#f59e0b', offline: '#94a3b8' };
  const SELECTED = '#2563eb';
  const TRAIL_MS = 15 * 60 * 1000;
  /** The subscribed box reaches this fraction of the viewport beyond each edge. */
  const BBOX_MARGIN = 0.25;
  const MOVE_MS = 700;
  const RATE_WINDOW_S = 5;
  const SPARK_S = 60;

  // ---------------------------------------------------------------- API key
  // With authentication on, open the map as `/#key=<reader key>`: the key is kept in this tab's
  // session storage (never sent in a URL except the stream's `access_token`, which browsers' WebSockets
  // need) and removed from the address bar.
  const API_KEY = (() => {
    const match = /(?:^#|&)key=([^&]+)/.exec(location.hash);
    if (match) {
      sessionStorage.setItem('fleettracker-key', decodeURIComponent(match[1]));
      history.replaceState(null, '', location.pathname + location.search);
    }
    return sessionStorage.getItem('fleettracker-key');
  })();
  const apiHeaders = () => {
    const headers = { accept: 'application/json' };
    if (API_KEY) headers.authorization = `Bearer ${API_KEY}`;
    return headers;
  };

  // ---------------------------------------------------------------- projection (Web Mercator)

  const worldSize = (z) => TILE * Math.pow(2, z);
  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  const wrapLon = (lon) => ((((lon + 180) % 360) + 360) % 360) - 180;
  const lonToX = (lon, z) => ((lon + 180) / 360) * worldSize(z);
  const latToY = (lat, z) => {
    const s = Math.sin((clamp(lat, -MAX_LAT, MAX_LAT) * Math.PI) / 180);
    return (0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI)) * worldSize(z);
  };
  const xToLon = (x, z) => (x / worldSize(z)) * 360 - 180;
  const yToLat = (y, z) => {
    const n = Math.PI - (2 * Math.PI * y) / worldSize(z);
    return (180 / Math.PI) * Math.atan(Math.sinh(n));
  };

  // ---------------------------------------------------------------- state

  const $ = (id) => document.getElementById(id);
  const canvas = $('canvas');
  const ctx = canvas.getContext('2d');
  const mapEl = $('map');

  const view = initialView();
  let width = 0;
  let height = 0;
  let dpr = 1;

  /** id → driver: latest position and, while it glides there, where it came from. */
  const drivers = new Map();
  let selected = null;
  let hoverId = null;
  let config = { tile_url: null, attribution: null };

  let socket = null;
  let connState = 'connecting';
  let subscribedKey = null;
  let subscribedBbox = null;
  let reconnectTimer = null;
  let reconnectDelay = 1000;
  let minIntervalMs = 0;
  let messagesTotal = 0;
  let snapshotsTotal = 0;

  /** Position updates in view per whole second, for the rate and the sparkline. */
  const rateBuckets = new Map();
  /** Every position message of the stream (the subscribed box reaches past the view). */
  const streamBuckets = new Map();
  const startedAt = performance.now();

  function initialView() {
    const q = new URLSearchParams(location.search);
    const num = (name, lo, hi) => {
      const v = Number.parseFloat(q.get(name) ?? '');
      return Number.isFinite(v) && v >= lo && v <= hi ? v : null;
    };
    const lat = num('lat', -MAX_LAT, MAX_LAT);
    const lon = num('lon', -180, 180);
    const zoom = num('zoom', MIN_ZOOM, MAX_ZOOM);
    return {
      lat: lat ?? DEFAULT_VIEW.lat,
      lon: lon ?? DEFAULT_VIEW.lon,
      zoom: zoom ?? DEFAULT_VIEW.zoom,
    };
  }

  /** Screen position (CSS pixels in the canvas) of a point, on the world copy nearest the centre. */
  function toScreen(lat, lon) {
    const z = view.zoom;
    const world = worldSize(z);
    let dx = lonToX(lon, z) - lonToX(view.lon, z);
    if (dx > world / 2) dx -= world;
    if (dx < -world / 2) dx += world;
    return { x: width / 2 + dx, y: height / 2 + latToY(lat, z) - latToY(view.lat, z) };
  }

  function fromScreen(x, y) {
    const z = view.zoom;
    const wx = lonToX(view.lon, z) + x - width / 2;
    const wy = clamp(latToY(view.lat, z) + y - height / 2, 0, worldSize(z));
    return { lat: yToLat(wy, z), lon: wrapLon(xToLon(wx, z)) };
  }

  /** Moves the centre by a screen offset. */
  function panBy(dx, dy) {
    const z = view.zoom;
    const wx = lonToX(view.lon, z) + dx;
    const wy = clamp(latToY(view.lat, z) + dy, 0, worldSize(z));
    view.lon = wrapLon(xToLon(wx, z));
    view.lat = clamp(yToLat(wy, z), -MAX_LAT, MAX_LAT);
  }

  /** Zooms keeping the point under (x, y) where it is. */
  function zoomAt(zoom, x, y) {
    zoom = clamp(zoom, MIN_ZOOM, MAX_ZOOM);
    if (zoom === view.zoom) return;
    const anchor = fromScreen(x, y);
    view.zoom = zoom;
    const after = toScreen(anchor.lat, anchor.lon);
    panBy(after.x - x, after.y - y);
  }

  /** The subscribed area: the viewport plus a margin, as [minLon, minLat, maxLon, maxLat]. */
  function viewportBbox() {
    const z = view.zoom;
    const mx = width * BBOX_MARGIN;
    const my = height * BBOX_MARGIN;
    const cx = lonToX(view.lon, z);
    const cy = latToY(view.lat, z);
    const spanDeg = ((width + 2 * mx) / worldSize(z)) * 360;
    const north = yToLat(clamp(cy - height / 2 - my, 0, worldSize(z)), z);
    const south = yToLat(clamp(cy + height / 2 + my, 0, worldSize(z)), z);
    let west;
    let east;
    if (spanDeg >= 360) {
      west = -180;
      east = 180;
    } else {
      west = wrapLon(xToLon(cx - width / 2 - mx, z));
      east = west + spanDeg;
      if (east > 180) east -= 360; // crosses the antimeridian: minLon > maxLon
    }
    const r = (v) => Math.round(v * 1e6) / 1e6;
    return [r(west), r(clamp(south, -90, 90)), r(east), r(clamp(north, -90, 90))];
  }

  // ---------------------------------------------------------------- tiles

  const tiles = new Map();
  let tileFailures = 0;
  let tileFailuresTotal = 0;
  let tileSuccesses = 0;
  let tilesDownUntil = 0;
  let frame = 0;

  function tileUrl(z, x, y) {
    return config.tile_url
      .replaceAll('{z}', z)
      .replaceAll('{x}', x)
      .replaceAll('{y}', y)
      .replaceAll('{s}', 'abc'[(x + y) % 3]);
  }

  function tilesDown() {
    return performance.now() < tilesDownUntil;
  }

  /** The tile, loading it if it is new; null while tiles are known to be unreachable. */
  function tile(z, x, y, load) {
    const key = `${z}/${x}/${y}`;
    let t = tiles.get(key);
    if (t && t.state === 'error' && performance.now() > t.retryAt && !tilesDown()) {
      tiles.delete(key);
      t = undefined;
    }
    if (!t) {
      if (!load || tilesDown()) return null;
      const img = new Image();
      t = { img, state: 'loading', used: frame, retryAt: 0 };
      img.decoding = 'async';
      img.onload = () => {
        t.state = 'ok';
        tileSuccesses += 1;
        tileFailures = 0;
        tilesDownUntil = 0;
        requestRender();
      };
      img.onerror = () => {
        t.state = 'error';
        t.retryAt = performance.now() + 30000;
        tileFailures += 1;
        tileFailuresTotal += 1;
        // No tile server reachable: stop asking for a while, the grid stands in.
        if ((tileSuccesses === 0 && tileFailures >= 4) || tileFailures >= 24) {
          tilesDownUntil = performance.now() + 30000;
          tileFailures = 0;
        }
        updateTilesNote();
        requestRender();
      };
      img.src = tileUrl(z, x, y);
      tiles.set(key, t);
      if (tiles.size > 600) evictTiles();
    }
    t.used = frame;
    return t;
  }

  function evictTiles() {
    const old = [...tiles.entries()].filter(([, t]) => t.used < frame).sort((a, b) => a[1].used - b[1].used);
    for (const [key, t] of old.slice(0, tiles.size - 400)) {
      t.img.onload = null;
      t.img.onerror = null;
      t.img.src = '';
      tiles.delete(key);
    }
  }

  function tileState() {
    if (!config.tile_url) return 'off';
    if (tilesDown() || (tileSuccesses === 0 && tileFailuresTotal >= 4)) return 'unavailable';
    return tileSuccesses > 0 ? 'ok' : 'loading';
  }

  function updateTilesNote() {
    const state = tileState();
    $('tiles-note').hidden = !(state === 'unavailable' || state === 'off');
    $('tiles-note').textContent = state === 'off' ? 'Coordinate grid' : 'Map tiles unavailable · coordinate grid';
    $('attribution').textContent = state === 'ok' && config.attribution ? config.attribution : '';
  }

  /** Draws the tiles covering the view; a missing tile shows a loaded ancestor, else the grid. */
  function drawTiles() {
    if (!config.tile_url) return;
    const z = clamp(Math.round(view.zoom), 0, MAX_ZOOM);
    const scale = Math.pow(2, view.zoom - z);
    const n = Math.pow(2, z);
    const cx = lonToX(view.lon, z);
    const cy = latToY(view.lat, z);
    const x0 = Math.floor((cx - width / 2 / scale) / TILE);
    const x1 = Math.floor((cx + width / 2 / scale) / TILE);
    const y0 = Math.max(0, Math.floor((cy - height / 2 / scale) / TILE));
    const y1 = Math.min(n - 1, Math.floor((cy + height / 2 / scale) / TILE));
    for (let ty = y0; ty <= y1; ty++) {
      for (let tx = x0; tx <= x1; tx++) {
        const wx = ((tx % n) + n) % n;
        const sx = Math.floor(width / 2 + (tx * TILE - cx) * scale);
        const sy = Math.floor(height / 2 + (ty * TILE - cy) * scale);
        const sw = Math.ceil(width / 2 + ((tx + 1) * TILE - cx) * scale) - sx;
        const sh = Math.ceil(height / 2 + ((ty + 1) * TILE - cy) * scale) - sy;
        const t = tile(z, wx, ty, true);
        if (t && t.state === 'ok') {
          ctx.drawImage(t.img, sx, sy, sw, sh);
          continue;
        }
        // An ancestor already loaded, cropped to this tile's part of it.
        for (let up = 1; up <= 4 && z - up >= 0; up++) {
          const a = tile(z - up, wx >> up, ty >> up, false);
          if (a && a.state === 'ok') {
            const part = TILE / Math.pow(2, up);
            const ox = (wx - ((wx >> up) << up)) * part;
            const oy = (ty - ((ty >> up) << up)) * part;
            ctx.drawImage(a.img, ox, oy, part, part, sx, sy, sw, sh);
            break;
          }
        }
      }
    }
  }

  // ---------------------------------------------------------------- coordinate grid

  const GRID_STEPS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 45];

  function gridStep() {
    const pxPerDeg = worldSize(view.zoom) / 360;
    return GRID_STEPS.find((s) => s * pxPerDeg >= 110) ?? 90;
  }

  const decimals = (step) => Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
  const fmtLat = (lat, d) => `${Math.abs(lat).toFixed(d)}°${lat >= 0 ? 'N' : 'S'}`;
  const fmtLon = (lon, d) => `${Math.abs(lon).toFixed(d)}°${lon >= 0 ? 'E' : 'W'}`;

  function drawGrid() {
    ctx.fillStyle = '#eef2f6';
    ctx.fillRect(0, 0, width, height);
    const step = gridStep();
    const minor = step / 5;
    const nw = fromScreen(0, 0);
    const se = fromScreen(width, height);
    const z = view.zoom;
    const left = lonToX(view.lon, z) - width / 2;
    const lonAt = (x) => xToLon(left + x, z);
    const west = lonAt(0);
    const east = lonAt(width);
    const lines = (from, to, every, draw) => {
      const first = Math.ceil(from / every);
      const last = Math.floor(to / every);
      if (last - first > 400) return;
      for (let i = first; i <= last; i++) draw(i * every, i);
    };
    // Meridians and parallels every `spacing` degrees, in one stroke style.
    const gridLines = (spacing, style) => {
      ctx.strokeStyle = style;
      ctx.beginPath();
      lines(west, east, spacing, (lon) => {
        const x = Math.round(toScreenX(lon)) + 0.5;
        ctx.moveTo(x, 0);
        ctx.lineTo(x, height);
      });
      lines(se.lat, nw.lat, spacing, (lat) => {
        const y = Math.round(toScreen(lat, view.lon).y) + 0.5;
        ctx.moveTo(0, y);
        ctx.lineTo(width, y);
      });
      ctx.stroke();
    };
    ctx.lineWidth = 1;
    gridLines(minor, 'rgba(100, 116, 139, 0.10)');
    gridLines(step, 'rgba(71, 85, 105, 0.26)');
    // Labels on the top and left edges.
    const d = decimals(step);
    ctx.font = '11px system-ui, "DejaVu Sans", sans-serif';
    ctx.textBaseline = 'middle';
    const label = (text, x, y, align) => {
      const w = ctx.measureText(text).width + 10;
      const bx = align === 'center' ? x - w / 2 : x;
      ctx.fillStyle = 'rgba(238, 242, 246, 0.92)';
      ctx.fillRect(bx, y - 8, w, 16);
      ctx.fillStyle = '#64748b';
      ctx.textAlign = 'left';
      ctx.fillText(text, bx + 5, y);
    };
    lines(west, east, step, (lon) => {
      const x = toScreenX(lon);
      if (x > 90 && x < width - 110) label(fmtLon(wrapLon(lon), d), x, 12, 'center');
    });
    lines(se.lat, nw.lat, step, (lat) => {
      const y = toScreen(lat, view.lon).y;
      if (y > 30 && y < height - 135) label(fmtLat(lat, d), 4, y, 'left');
    });
  }

  /** Screen x of a longitude, without wrapping to the nearest copy (for grid lines). */
  function toScreenX(lon) {
    const z = view.zoom;
    return width / 2 + lonToX(lon, z) - lonToX(view.lon, z);
  }

  // ---------------------------------------------------------------- drawing

  let renderQueued = false;

  function requestRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(render);
  }

  /** Where a driver is drawn now: gliding from its previous position to its latest. */
  function shownAt(d, now) {
    const t = d.moveStart ? (now - d.moveStart) / MOVE_MS : 1;
    if (t >= 1) {
      d.moveStart = 0;
      return { lat: d.lat, lon: d.lon, moving: false };
    }
    const e = t * (2 - t);
    return { lat: d.fromLat + (d.lat - d.fromLat) * e, lon: d.fromLon + (d.lon - d.fromLon) * e, moving: true };
  }

  function render() {
    renderQueued = false;
    frame += 1;
    const now = performance.now();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    drawGrid();
    drawTiles();
    drawTrail();

    let moving = false;
    const byStatus = { online: [], busy: [], offline: [] };
    for (const d of drivers.values()) {
      const at = shownAt(d, now);
      moving ||= at.moving;
      const p = toScreen(at.lat, at.lon);
      d.sx = p.x;
      d.sy = p.y;
      if (p.x < -10 || p.y < -10 || p.x > width + 10 || p.y > height + 10) continue;
      (byStatus[d.status] ?? byStatus.online).push(d);
    }
    const r = view.zoom >= 15 ? 6 : view.zoom >= 12 ? 5 : 4;
    for (const [status, list] of Object.entries(byStatus)) {
      if (list.length === 0) continue;
      ctx.beginPath();
      for (const d of list) {
        ctx.moveTo(d.sx + r, d.sy);
        ctx.arc(d.sx, d.sy, r, 0, 2 * Math.PI);
      }
      ctx.fillStyle = COLORS[status];
      ctx.fill();
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = '#ffffff';
      ctx.stroke();
    }

    const sel = selected && drivers.get(selected.id);
    if (sel) {
      ctx.beginPath();
      ctx.arc(sel.sx, sel.sy, r + 5, 0, 2 * Math.PI);
      ctx.lineWidth = 3;
      ctx.strokeStyle = SELECTED;
      ctx.stroke();
      ctx.beginPath();
      ctx.arc(sel.sx, sel.sy, r + 1.5, 0, 2 * Math.PI);
      ctx.fillStyle = COLORS[sel.status] ?? COLORS.online;
      ctx.fill();
      ctx.lineWidth = 2;
      ctx.strokeStyle = '#fff';
      ctx.stroke();
    }
    const hover = hoverId && drivers.get(hoverId);
    if (hover) drawTag(hover.id, hover.sx, hover.sy - r - 8);
    else if (sel) drawTag(sel.id, sel.sx, sel.sy - r - 10);

    if (moving) requestRender();
  }

  function drawTag(text, x, y) {
    ctx.font = '600 12px system-ui, "DejaVu Sans", sans-serif';
    const w = ctx.measureText(text).width + 14;
    const h = 22;
    const bx = clamp(x - w / 2, 4, width - w - 4);
    const by = clamp(y - h, 4, height - h - 4);
    ctx.fillStyle = 'rgba(15, 23, 42, 0.88)';
    roundRect(bx, by, w, h, 6);
    ctx.fill();
    ctx.fillStyle = '#fff';
    ctx.textAlign = 'left';
    ctx.textBaseline = 'middle';
    ctx.fillText(text, bx + 7, by + h / 2 + 0.5);
  }

  function roundRect(x, y, w, h, r) {
    ctx.beginPath();
    ctx.moveTo(x + r, y);
    ctx.arcTo(x + w, y, x + w, y + h, r);
    ctx.arcTo(x + w, y + h, x, y + h, r);
    ctx.arcTo(x, y + h, x, y, r);
    ctx.arcTo(x, y, x + w, y, r);
    ctx.closePath();
  }

  function drawTrail() {
    if (!selected || selected.trail.length < 2) return;
    const pts = selected.trail.map((p) => toScreen(p.lat, p.lon));
    const d = drivers.get(selected.id);
    if (d && d.sx !== undefined) pts.push({ x: d.sx, y: d.sy });
    const path = () => {
      ctx.beginPath();
      pts.forEach((p, i) => (i === 0 ? ctx.moveTo(p.x, p.y) : ctx.lineTo(p.x, p.y)));
    };
    ctx.lineJoin = 'round';
    ctx.lineCap = 'round';
    path();
    ctx.lineWidth = 7;
    ctx.strokeStyle = 'rgba(255, 255, 255, 0.85)';
    ctx.stroke();
    path();
    ctx.lineWidth = 3.5;
    ctx.strokeStyle = SELECTED;
    ctx.stroke();
    const start = pts[0];
    ctx.beginPath();
    ctx.arc(start.x, start.y, 4, 0, 2 * Math.PI);
    ctx.fillStyle = '#fff';
    ctx.fill();
    ctx.lineWidth = 2;
    ctx.strokeStyle = SELECTED;
    ctx.stroke();
  }

  function resize() {
    const rect = mapEl.getBoundingClientRect();
    width = Math.max(1, Math.round(rect.width));
    height = Math.max(1, Math.round(rect.height));
    dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    requestRender();
    viewChanged();
  }

  // ---------------------------------------------------------------- the stream

  function setConn(state, text) {
    connState = state;
    const el = $('conn');
    el.dataset.state = state;
    el.textContent = text;
  }

  function showNotice(text) {
    $('notice').hidden = !text;
    $('notice').textContent = text || '';
  }

  /** Follows the viewport: connects, or re-subscribes the open socket to the new box. */
  function follow() {
    if (width <= 1) return;
    if (view.zoom < LIVE_MIN_ZOOM) {
      disconnect();
      drivers.clear();
      setConn('paused', 'Paused');
      showNotice('Zoom in to follow drivers live');
      requestRender();
      return;
    }
    showNotice('');
    const bbox = viewportBbox();
    const key = `${bbox.join(',')}|${minIntervalMs}`;
    if (socket && socket.readyState === WebSocket.OPEN) {
      if (key !== subscribedKey) {
        const message = { type: 'subscribe', bbox };
        if (minIntervalMs) message.min_interval_ms = minIntervalMs;
        socket.send(JSON.stringify(message));
        subscribedKey = key;
        subscribedBbox = bbox;
      }
    } else if (!socket && !reconnectTimer) {
      connect(bbox, key);
    }
  }

  function connect(bbox, key) {
    const url = new URL('/v1/stream', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('bbox', bbox.join(','));
    if (minIntervalMs) url.searchParams.set('min_interval_ms', String(minIntervalMs));
    if (API_KEY) url.searchParams.set('access_token', API_KEY);
    if (connState !== 'reconnecting') setConn('connecting', 'Connecting');
    const ws = new WebSocket(url);
    socket = ws;
    subscribedKey = key;
    subscribedBbox = bbox;
    ws.onopen = () => {
      reconnectDelay = 1000;
      setConn('live', 'Live');
      follow(); // the view may have moved while connecting
    };
    ws.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      onMessage(message);
    };
    ws.onclose = (event) => {
      if (socket !== ws) return; // closed on purpose
      socket = null;
      subscribedKey = null;
      if (event.code === 1013) minIntervalMs = 1000; // too slow for every update: coalesce
      setConn('reconnecting', 'Reconnecting');
      const delay = reconnectDelay;
      reconnectDelay = Math.min(reconnectDelay * 2, 15000);
      reconnectTimer = setTimeout(() => {
        reconnectTimer = null;
        follow();
      }, delay);
    };
  }

  function disconnect() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (socket) {
      const ws = socket;
      socket = null;
      subscribedKey = null;
      ws.close(1000, 'zoomed out');
    }
  }

  function onMessage(m) {
    messagesTotal += 1;
    switch (m.type) {
      case 'snapshot':
        if (m.part === 0) {
          snapshotsTotal += 1;
          drivers.clear();
          showNotice('');
        }
        for (const d of m.drivers) upsert(d, false);
        break;
      case 'position': {
        upsert(m, true);
        const p = toScreen(m.latitude, m.longitude);
        countUpdate(p.x >= 0 && p.y >= 0 && p.x <= width && p.y <= height);
        break;
      }
      case 'removed':
        drivers.delete(m.driver_id);
        if (selected && selected.id === m.driver_id) selected.gone = m.reason;
        break;
      case 'error':
        console.warn('stream error', m.error);
        showNotice(m.error && m.error.message ? `Stream: ${m.error.message}` : 'Stream error');
        break;
      default:
        break;
    }
    if (selected && m.type === 'snapshot' && !m.more && !drivers.has(selected.id) && !selected.gone) {
      selected.gone = 'left_area';
    }
    requestRender();
  }

  function upsert(p, animate) {
    const id = p.driver_id;
    const d = drivers.get(id);
    const now = performance.now();
    if (d && animate) {
      const at = shownAt(d, now);
      d.fromLat = at.lat;
      d.fromLon = at.lon;
      d.moveStart = now;
    }
    const next = d ?? { id, moveStart: 0 };
    next.lat = p.latitude;
    next.lon = p.longitude;
    next.status = p.status;
    next.timestamp = p.timestamp;
    next.speed = p.speed_mps;
    next.heading = p.heading_deg;
    if (!d) drivers.set(id, next);
    if (selected && selected.id === id) {
      selected.gone = null;
      extendTrail(next);
    }
  }

  /** Counts a position update: in view (the rate and sparkline), and on the stream. */
  function countUpdate(inView) {
    const s = Math.floor(Date.now() / 1000);
    if (inView) rateBuckets.set(s, (rateBuckets.get(s) ?? 0) + 1);
    streamBuckets.set(s, (streamBuckets.get(s) ?? 0) + 1);
  }

  /** Per second over the last few whole seconds. */
  function perSecond(buckets) {
    const nowS = Math.floor(Date.now() / 1000);
    for (const s of buckets.keys()) if (s < nowS - SPARK_S) buckets.delete(s);
    const elapsed = Math.max(1, Math.min(RATE_WINDOW_S, Math.floor((performance.now() - startedAt) / 1000)));
    let sum = 0;
    for (let s = nowS - elapsed; s < nowS; s++) sum += buckets.get(s) ?? 0;
    return sum / elapsed;
  }

  // ---------------------------------------------------------------- selection and trail

  function select(id) {
    if (!id) {
      selected = null;
      $('driver-card').hidden = true;
      requestRender();
      return;
    }
    if (selected && selected.id === id) return;
    const d = drivers.get(id);
    selected = { id, trail: [], trailState: 'loading', pending: [], gone: null };
    $('driver-card').hidden = false;
    updateDriverCard();
    requestRender();
    loadTrail(selected, d);
  }

  async function loadTrail(sel, d) {
    // The window is taken from the driver's own clock, so a skewed browser clock cannot empty it.
    const reference = d && Date.parse(d.timestamp);
    const from = new Date((Number.isFinite(reference) ? reference : Date.now()) - TRAIL_MS);
    const url = `/v1/drivers/${encodeURIComponent(sel.id)}/track?from=${encodeURIComponent(from.toISOString())}&simplify_m=2`;
    let state;
    let points = [];
    try {
      const response = await fetch(url, { headers: apiHeaders() });
      if (response.ok) {
        const body = await response.json();
        points = body.points.map((p) => ({ lat: p.latitude, lon: p.longitude, t: Date.parse(p.timestamp) }));
        state = points.length ? 'ok' : 'empty';
      } else {
        state = response.status === 503 ? 'unavailable' : 'error';
      }
    } catch {
      state = 'error';
    }
    if (selected !== sel) return;
    const last = points.length ? points[points.length - 1].t : -Infinity;
    sel.trail = points.concat(sel.pending.filter((p) => p.t > last));
    sel.pending = [];
    sel.trailState = state === 'empty' && sel.trail.length ? 'ok' : state;
    updateDriverCard();
    requestRender();
  }

  function extendTrail(d) {
    const point = { lat: d.lat, lon: d.lon, t: Date.parse(d.timestamp) };
    if (selected.trailState === 'loading') {
      selected.pending.push(point);
      return;
    }
    if (selected.trailState === 'unavailable' || selected.trailState === 'error') return;
    const trail = selected.trail;
    const last = trail[trail.length - 1];
    if (last && point.t <= last.t) return;
    trail.push(point);
    while (trail.length && trail[0].t < point.t - TRAIL_MS) trail.shift();
    if (selected.trailState === 'empty') selected.trailState = 'ok';
  }

  // ---------------------------------------------------------------- panel

  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
  const numberFormat = new Intl.NumberFormat();

  function ago(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 2) return 'just now';
    if (s < 90) return `${s} s ago`;
    const m = Math.round(s / 60);
    return m < 90 ? `${m} min ago` : `${Math.round(m / 60)} h ago`;
  }

  const REASONS = { offline: 'went offline', expired: 'stopped reporting', left_area: 'left the visible area' };

  function updateDriverCard() {
    if (!selected) return;
    const d = drivers.get(selected.id);
    $('driver-id').textContent = selected.id;
    const badge = $('driver-status');
    if (d && !selected.gone) {
      badge.textContent = d.status;
      badge.dataset.status = d.status;
      delete badge.dataset.gone;
    } else {
      badge.textContent = selected.gone ? `Not in view · ${REASONS[selected.gone] ?? selected.gone}` : 'Not in view';
      badge.dataset.gone = '1';
      delete badge.dataset.status;
    }
    if (d) {
      const t = Date.parse(d.timestamp);
      $('driver-updated').textContent = Number.isFinite(t) ? `${timeFormat.format(t)} · ${ago(Date.now() - t)}` : d.timestamp;
      $('driver-position').textContent = `${d.lat.toFixed(5)}, ${d.lon.toFixed(5)}`;
      $('driver-speed').textContent = d.speed != null ? `${(d.speed * 3.6).toFixed(1)} km/h` : '—';
      $('driver-heading').textContent = d.heading != null ? `${Math.round(d.heading)}°` : '—';
    }
    const note = $('trail-note');
    note.dataset.state = selected.trailState;
    const n = selected.trail.length;
    note.textContent = {
      loading: 'Loading the last 15 minutes…',
      ok: `Trail: ${formatDistance(trailLength(selected.trail))} in the last 15 min (${numberFormat.format(n)} point${n === 1 ? '' : 's'})`,
      empty: 'No history in the last 15 minutes.',
      unavailable: 'History is unavailable on this server.',
      error: 'History could not be loaded.',
    }[selected.trailState];
  }

  function formatDistance(m) {
    return m >= 1000 ? `${(m / 1000).toFixed(m >= 10000 ? 0 : 1)}\u00a0km` : `${Math.round(m)}\u00a0m`;
  }

  /** Great-circle length of a trail, metres. */
  function trailLength(points) {
    const rad = Math.PI / 180;
    let total = 0;
    for (let i = 1; i < points.length; i++) {
      const a = points[i - 1];
      const b = points[i];
      const h =
        Math.sin(((b.lat - a.lat) * rad) / 2) ** 2 +
        Math.cos(a.lat * rad) * Math.cos(b.lat * rad) * Math.sin(((b.lon - a.lon) * rad) / 2) ** 2;
      total += 2 * 6371008.8 * Math.asin(Math.min(1, Math.sqrt(h)));
    }
    return total;
  }

  function updatePanel() {
    let online = 0;
    let busy = 0;
    for (const d of drivers.values()) {
      if (d.sx === undefined || d.sx < 0 || d.sy < 0 || d.sx > width || d.sy > height) continue;
      if (d.status === 'busy') busy += 1;
      else online += 1;
    }
    $('view-online').textContent = numberFormat.format(online);
    $('view-busy').textContent = numberFormat.format(busy);
    $('view-total').textContent = numberFormat.format(online + busy);
    const fmtRate = (r) => (r >= 100 ? numberFormat.format(Math.round(r)) : r.toFixed(1));
    $('rate').textContent = fmtRate(perSecond(rateBuckets));
    $('stream-rate').textContent = `${fmtRate(perSecond(streamBuckets))} msg/s`;
    drawSpark();
    updateDriverCard();
    updateScale();
    updateTilesNote();
  }

  function drawSpark() {
    const el = $('spark');
    const ratio = window.devicePixelRatio || 1;
    const w = el.clientWidth || 300;
    const h = el.clientHeight || 44;
    if (el.width !== Math.round(w * ratio)) {
      el.width = Math.round(w * ratio);
      el.height = Math.round(h * ratio);
    }
    const g = el.getContext('2d');
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const nowS = Math.floor(Date.now() / 1000);
    const values = [];
    for (let s = nowS - SPARK_S; s < nowS; s++) values.push(rateBuckets.get(s) ?? 0);
    const max = Math.max(1, ...values);
    const bw = w / SPARK_S;
    g.fillStyle = '#f1f5f9';
    g.fillRect(0, h - 1, w, 1);
    g.fillStyle = '#22c55e';
    values.forEach((v, i) => {
      const bh = Math.max(v ? 2 : 0, (v / max) * (h - 4));
      g.fillRect(i * bw + 0.5, h - bh, Math.max(1, bw - 1), bh);
    });
  }

  function updateScale() {
    const metresPerPx = (156543.03392 * Math.cos((view.lat * Math.PI) / 180)) / Math.pow(2, view.zoom);
    const target = metresPerPx * 110;
    const pow = Math.pow(10, Math.floor(Math.log10(target)));
    const nice = [5, 2, 1].map((k) => k * pow).find((v) => v <= target) ?? pow;
    $('scale-bar').style.width = `${Math.round(nice / metresPerPx)}px`;
    $('scale-label').textContent = formatDistance(nice);
  }

  // ---------------------------------------------------------------- fleet stats

  let lastStats = null;

  async function pollStats() {
    try {
      const response = await fetch('/v1/stats', { headers: apiHeaders() });
      if (!response.ok) return;
      const s = await response.json();
      const now = performance.now();
      $('fleet-online').textContent = numberFormat.format(s.drivers.online);
      $('fleet-busy').textContent = numberFormat.format(s.drivers.busy);
      $('fleet-offline').textContent = numberFormat.format(s.drivers.offline);
      $('fleet-total').textContent = numberFormat.format(s.drivers.total);
      if (lastStats && now > lastStats.at) {
        const rate = ((s.updates_total - lastStats.updates) * 1000) / (now - lastStats.at);
        $('fleet-rate').textContent = `${numberFormat.format(Math.round(Math.max(0, rate)))}/s · ${numberFormat.format(s.updates_total)} total`;
      } else {
        $('fleet-rate').textContent = `${numberFormat.format(s.updates_total)} total`;
      }
      lastStats = { at: now, updates: s.updates_total };
    } catch {
      // The next poll tries again; the connection pill tells the story.
    }
  }

  // ---------------------------------------------------------------- input

  let settleTimer = null;

  /** After a pan or zoom settles: follow the new box and keep the URL shareable. */
  function viewChanged() {
    clearTimeout(settleTimer);
    settleTimer = setTimeout(() => {
      follow();
      const q = new URLSearchParams(location.search);
      q.set('lat', view.lat.toFixed(5));
      q.set('lon', view.lon.toFixed(5));
      q.set('zoom', String(Math.round(view.zoom * 100) / 100));
      history.replaceState(null, '', `${location.pathname}?${q}`);
    }, 200);
  }

  function driverAt(x, y, within) {
    let best = null;
    let bestD = within * within;
    for (const d of drivers.values()) {
      if (d.sx === undefined) continue;
      const dd = (d.sx - x) ** 2 + (d.sy - y) ** 2;
      if (dd <= bestD) {
        best = d;
        bestD = dd;
      }
    }
    return best;
  }

  const canvasPoint = (e) => {
    const rect = canvas.getBoundingClientRect();
    return { x: e.clientX - rect.left, y: e.clientY - rect.top };
  };

  let drag = null;

  canvas.addEventListener('pointerdown', (e) => {
    if (e.button !== 0) return;
    canvas.setPointerCapture(e.pointerId);
    const p = canvasPoint(e);
    drag = { x: p.x, y: p.y, startX: p.x, startY: p.y, moved: false };
  });

  canvas.addEventListener('pointermove', (e) => {
    const p = canvasPoint(e);
    if (drag) {
      if (!drag.moved && Math.hypot(p.x - drag.startX, p.y - drag.startY) > 4) {
        drag.moved = true;
        canvas.classList.add('dragging');
      }
      if (drag.moved) {
        panBy(drag.x - p.x, drag.y - p.y);
        drag.x = p.x;
        drag.y = p.y;
        requestRender();
      }
      return;
    }
    const hit = driverAt(p.x, p.y, 9);
    const id = hit ? hit.id : null;
    if (id !== hoverId) {
      hoverId = id;
      canvas.classList.toggle('pointer', !!id);
      requestRender();
    }
    const ll = fromScreen(p.x, p.y);
    $('coords').textContent = `${fmtLat(ll.lat, 5)}  ${fmtLon(ll.lon, 5)}`;
  });

  const endDrag = (e) => {
    if (!drag) return;
    const wasMoved = drag.moved;
    drag = null;
    canvas.classList.remove('dragging');
    if (wasMoved) {
      viewChanged();
    } else if (e.type === 'pointerup') {
      const p = canvasPoint(e);
      const hit = driverAt(p.x, p.y, 12);
      select(hit ? hit.id : null);
    }
  };
  canvas.addEventListener('pointerup', endDrag);
  canvas.addEventListener('pointercancel', endDrag);
  canvas.addEventListener('pointerleave', () => {
    if (hoverId) {
      hoverId = null;
      requestRender();
    }
    $('coords').textContent = '';
  });

  canvas.addEventListener(
    'wheel',
    (e) => {
      e.preventDefault();
      const p = canvasPoint(e);
      const lines = e.deltaMode === 1 ? 40 : e.deltaMode === 2 ? 800 : 1;
      zoomAt(view.zoom - clamp(e.deltaY * lines, -300, 300) * 0.0025, p.x, p.y);
      requestRender();
      viewChanged();
    },
    { passive: false },
  );

  function zoomBy(delta) {
    const target = clamp(Math.round(view.zoom) + delta, MIN_ZOOM, MAX_ZOOM);
    zoomAt(target, width / 2, height / 2);
    requestRender();
    viewChanged();
  }

  $('zoom-in').addEventListener('click', () => zoomBy(1));
  $('zoom-out').addEventListener('click', () => zoomBy(-1));
  $('driver-close').addEventListener('click', () => select(null));

  canvas.addEventListener('keydown', (e) => {
    const pan = { ArrowLeft: [-100, 0], ArrowRight: [100, 0], ArrowUp: [0, -100], ArrowDown: [0, 100] }[e.key];
    if (pan) {
      panBy(pan[0], pan[1]);
      requestRender();
      viewChanged();
    } else if (e.key === '+' || e.key === '=') {
      zoomBy(1);
    } else if (e.key === '-' || e.key === '_') {
      zoomBy(-1);
    } else if (e.key === 'Escape') {
      select(null);
    } else {
      return;
    }
    e.preventDefault();
  });

  // ---------------------------------------------------------------- test hook

  /** For tests and the console: read-only views of the map's state, and a way to move it. */
  window.fleetMap = {
    driverCount: () => drivers.size,
    driverIds: () => [...drivers.keys()],
    positionsOf: (ids) => {
      const out = {};
      for (const id of ids) {
        const d = drivers.get(id);
        if (d) out[id] = { latitude: d.lat, longitude: d.lon, status: d.status, timestamp: d.timestamp };
      }
      return out;
    },
    /** Where a driver is drawn, in page coordinates (for clicking it), or null. */
    screenPointOf: (id) => {
      const d = drivers.get(id);
      if (!d || d.sx === undefined || d.sx < 0 || d.sy < 0 || d.sx > width || d.sy > height) return null;
      const rect = canvas.getBoundingClientRect();
      return { x: rect.left + d.sx, y: rect.top + d.sy };
    },
    view: () => ({ ...view }),
    setView: (lat, lon, zoom) => {
      view.lat = clamp(lat, -MAX_LAT, MAX_LAT);
      view.lon = wrapLon(lon);
      view.zoom = clamp(zoom ?? view.zoom, MIN_ZOOM, MAX_ZOOM);
      requestRender();
      viewChanged();
    },
    selected: () => (selected ? selected.id : null),
    trail: () => (selected ? { state: selected.trailState, points: selected.trail.length } : null),
    connection: () => connState,
    subscribedBbox: () => subscribedBbox,
    snapshots: () => snapshotsTotal,
    messages: () => messagesTotal,
    tiles: () => tileState(),
  };

  // ---------------------------------------------------------------- start

  async function start() {
    try {
      const response = await fetch('/map/config.json');
      if (response.ok) config = await response.json();
    } catch {
      // No config: the grid alone.
    }
    new ResizeObserver(resize).observe(mapEl);
    resize();
    updateTilesNote();
    pollStats();
    setInterval(pollStats, 3000);
    setInterval(updatePanel, 500);
    updatePanel();
  }

  start();
})();
