// Line charts as inline SVG, drawn here (no library): a time axis, a value axis with round ticks,
// grid lines, the series as one path, and dots when there are few points. Sizes are in viewBox
// units; the stylesheet scales the SVG to its container. Colours come from app.css classes
// (the Content-Security-Policy allows no inline styles).

const NS = 'http://www.w3.org/2000/svg';

export function svg(tag, attrs, ...children) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

// Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten, at least minStep.
export function niceTicks(lo, hi, want = 5, minStep = 0) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [0, 1];
  if (lo === hi) {
    const pad = Math.abs(lo) > 1 ? Math.abs(lo) * 0.1 : 1;
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / Math.max(1, want);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = Math.max(minStep, [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag);
  const first = Math.floor(lo / step) * step;
  const ticks = [];
  for (let v = first; v <= hi + step * 0.5; v += step) ticks.push(Number(v.toPrecision(12)));
  if (ticks[ticks.length - 1] < hi) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
  return ticks;
}

const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400].map((s) => s * 1000);

// Local-time tick marks at round intervals between from and to (ms).
export function timeTicks(from, to, want = 6) {
  const span = Math.max(1, to - from);
  const step = TIME_STEPS.find((s) => span / s <= want) || TIME_STEPS[TIME_STEPS.length - 1];
  // Round in local time so "10:00" lands on the hour where the user is.
  const off = new Date(from).getTimezoneOffset() * 60000;
  const ticks = [];
  for (let t = Math.ceil((from - off) / step) * step + off; t <= to; t += step) ticks.push(t);
  return { ticks, step };
}

const pad2 = (n) => String(n).padStart(2, '0');

export function formatTick(t, step) {
  const d = new Date(t);
  const hm = `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  if (step < 60000) return `${hm}:${pad2(d.getSeconds())}`;
  if (step >= 86400000) return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}`;
  return hm;
}

export function formatValue(v) {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  return String(Number(v.toPrecision(6)));
}

// A line chart of points [{t, v}] (t in ms, sorted) between from and to.
// opts: title (for screen readers and the tooltip), yLabel, width, height, testid, empty (text
// shown without points), className, zero (the value axis starts at 0 and ticks are whole: counts). The SVG carries data-count (points drawn) for tests.
export function lineChart(points, from, to, opts = {}) {
  const W = opts.width || 1200, H = opts.height || 320;
  const m = { l: 64, r: 16, t: 16, b: 44 };
  const pw = W - m.l - m.r, ph = H - m.t - m.b;
  const vals = points.map((p) => p.v).filter(Number.isFinite);
  let lo = vals.length ? Math.min(...vals) : 0, hi = vals.length ? Math.max(...vals) : 1;
  if (opts.zero) { lo = Math.min(lo, 0); hi = Math.max(hi, 1); } // counts: from zero, at least 0..1
  const yt = niceTicks(lo, hi, 5, opts.zero ? 1 : 0);
  lo = yt[0];
  hi = yt[yt.length - 1];
  if (hi === lo) hi = lo + 1;
  const x = (t) => m.l + ((t - from) / Math.max(1, to - from)) * pw;
  const y = (v) => m.t + ph - ((v - lo) / (hi - lo)) * ph;
  const label = opts.title || 'chart';
  const root = svg('svg', {
    viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${label}: ${points.length} points`,
    class: `chart ${opts.className || ''}`.trim(), 'data-testid': opts.testid, 'data-count': points.length,
    preserveAspectRatio: 'xMidYMid meet',
  }, svg('title', {}, label));

  // Grid and value axis.
  const grid = svg('g', { class: 'grid' });
  const yAxis = svg('g', { class: 'axis axis-y' });
  for (const v of yt) {
    const yy = y(v);
    grid.append(svg('line', { x1: m.l, x2: m.l + pw, y1: yy, y2: yy }));
    yAxis.append(svg('text', { x: m.l - 8, y: yy, 'text-anchor': 'end', 'dominant-baseline': 'middle' }, formatValue(v)));
  }
  const { ticks, step } = timeTicks(from, to, Math.max(3, Math.floor(pw / 110)));
  const xAxis = svg('g', { class: 'axis axis-x' });
  for (const t of ticks) {
    const xx = x(t);
    grid.append(svg('line', { x1: xx, x2: xx, y1: m.t, y2: m.t + ph }));
    xAxis.append(svg('text', { x: xx, y: m.t + ph + 18, 'text-anchor': 'middle' }, formatTick(t, step)));
  }
  root.append(grid, yAxis, xAxis);
  root.append(svg('line', { class: 'axis-line', x1: m.l, x2: m.l + pw, y1: m.t + ph, y2: m.t + ph }));
  root.append(svg('line', { class: 'axis-line', x1: m.l, x2: m.l, y1: m.t, y2: m.t + ph }));
  if (opts.yLabel) {
    root.append(svg('text', {
      class: 'axis-title', x: 14, y: m.t + ph / 2, 'text-anchor': 'middle',
      transform: `rotate(-90 14 ${m.t + ph / 2})`,
    }, opts.yLabel));
  }
  root.append(svg('text', { class: 'axis-title', x: m.l + pw / 2, y: H - 6, 'text-anchor': 'middle' }, opts.xLabel || 'time'));

  const inside = points.filter((p) => Number.isFinite(p.v));
  if (!inside.length) {
    root.append(svg('text', { class: 'chart-empty', x: m.l + pw / 2, y: m.t + ph / 2, 'text-anchor': 'middle' }, opts.empty || 'no data in this range'));
    return root;
  }
  // Clip to the plot so a point a little outside [from, to] does not draw over the axes.
  const clipId = `clip-${Math.random().toString(36).slice(2)}`;
  root.append(svg('defs', {}, svg('clipPath', { id: clipId }, svg('rect', { x: m.l, y: m.t - 4, width: pw, height: ph + 8 }))));
  const d = inside.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join('');
  const g = svg('g', { 'clip-path': `url(#${clipId})` });
  g.append(svg('path', { class: 'series', d, 'data-testid': opts.testid ? `${opts.testid}-line` : undefined }));
  if (inside.length <= 120) {
    for (const p of inside) {
      g.append(svg('circle', { class: 'dot', cx: x(p.t).toFixed(1), cy: y(p.v).toFixed(1), r: 2.5 },
        svg('title', {}, `${new Date(p.t).toLocaleString()}: ${formatValue(p.v)}`)));
    }
  }
  root.append(g);
  return root;
}

// A horizontal stacked bar (rollout stage progress): parts [{n, className, label}] of total.
export function stackedBar(parts, total, opts = {}) {
  const W = opts.width || 400, H = opts.height || 14;
  const root = svg('svg', {
    viewBox: `0 0 ${W} ${H}`, class: 'bar', role: 'img', preserveAspectRatio: 'none',
    'aria-label': opts.label || parts.map((p) => `${p.label} ${p.n}`).join(', '), 'data-testid': opts.testid,
  });
  root.append(svg('rect', { class: 'bar-bg', x: 0, y: 0, width: W, height: H }));
  let x = 0;
  for (const p of parts) {
    if (!p.n || !total) continue;
    const w = (p.n / total) * W;
    root.append(svg('rect', { class: p.className, x: x.toFixed(2), y: 0, width: w.toFixed(2), height: H }, svg('title', {}, `${p.label}: ${p.n}`)));
    x += w;
  }
  return root;
}
