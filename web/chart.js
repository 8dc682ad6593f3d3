// chart.js: a small, dependency-free live line chart on <canvas>.
//
//   const c = new LineChart(canvas, {
//     series: [{ label: 'RTT', color: '#2563eb', fill: true }],
//     windowMs: 60_000, yMin: 0, unit: 'ms',
//   });
//   c.push([12.5]);          // one value per series, timestamped now
//
// The canvas exposes data-points (samples pushed so far), data-last (the last
// value of the first series), data-updated (a counter bumped on every push),
// which tests read to see that a chart keeps moving, and data-clipped (points
// drawn clipped at the top of their scale as last drawn).
//
// Two scales: a series with `axis: 'alt'` is drawn against a scale of its own,
// labelled on the left in the series' colour (the main scale is labelled on
// the right), so that a rate of refusals does not flatten a rate of successes,
// nor a queue length a percentage.
//
// Spikes: an automatic scale follows the bulk of the values (2.5× their 90th
// percentile, each point weighted by the time until the next), not the single
// largest, so that one 270 ms spike does not flatten a line that runs at 2 ms. A point above the scale is drawn at the
// top with a marker, and the largest clipped value is printed there: the
// spike is shown and labelled, and everything else stays readable.

const now = () => performance.now();

export class LineChart {
  constructor(canvas, opts = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d');
    this.series = opts.series ?? [{ label: '', color: '#2563eb' }];
    this.windowMs = opts.windowMs ?? 60_000;
    this.yMin = opts.yMin ?? 0;
    this.yMax = opts.yMax ?? null; // null: auto
    this.yMaxFloor = opts.yMaxFloor ?? 1; // the auto scale never goes below this
    this.unit = opts.unit ?? '';
    this.format = opts.format ?? ((v) => formatNumber(v));
    this.guide = opts.guide ?? null; // {value, label} dashed horizontal line
    // The alternative scale, for series with `axis: 'alt'`: {yMax, yMaxFloor, unit}.
    this.alt = opts.alt ?? null;
    this.data = []; // [t, [v...]]
    this.pushed = 0;
    this._scheduled = false;
    this._ro = typeof ResizeObserver === 'function' ? new ResizeObserver(() => this.draw()) : null;
    this._ro?.observe(canvas);
    // Keep the x axis moving even without data.
    this._timer = setInterval(() => this.schedule(), 500);
    this.schedule();
  }

  push(values, t = now()) {
    this.data.push([t, values]);
    const cut = t - this.windowMs - 2_000;
    let i = 0;
    while (i < this.data.length && this.data[i][0] < cut) i++;
    if (i > 0) this.data.splice(0, i);
    this.pushed++;
    const ds = this.canvas.dataset;
    ds.points = String(this.pushed);
    ds.last = String(values[0]);
    ds.updated = String(this.pushed);
    this.schedule();
  }

  setGuide(guide) { this.guide = guide; this.schedule(); }

  schedule() {
    if (this._scheduled) return;
    this._scheduled = true;
    const run = () => { this._scheduled = false; this.draw(); };
    if (typeof requestAnimationFrame === 'function' && document.visibilityState === 'visible') {
      requestAnimationFrame(run);
    } else {
      setTimeout(run, 100);
    }
  }

  draw() {
    const { canvas, ctx } = this;
    const dpr = window.devicePixelRatio || 1;
    const cssW = canvas.clientWidth || 300;
    const cssH = canvas.clientHeight || 150;
    if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
      canvas.width = Math.round(cssW * dpr);
      canvas.height = Math.round(cssH * dpr);
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);

    const styles = getComputedStyle(canvas);
    const grid = styles.getPropertyValue('--chart-grid').trim() || '#e5e7eb';
    const text = styles.getPropertyValue('--chart-text').trim() || '#6b7280';
    const font = '11px system-ui, -apple-system, "Segoe UI", sans-serif';

    const padL = this.alt ? 40 : 8, padR = 58, padT = 22, padB = 18;
    const w = Math.max(10, cssW - padL - padR);
    const h = Math.max(10, cssH - padT - padB);
    const tNow = now();
    const t0 = tNow - this.windowMs;
    const visible = this.data.filter(([t]) => t >= t0 - 1000);

    const min = this.yMin;
    const onAlt = (si) => Boolean(this.alt) && this.series[si].axis === 'alt';
    const scaleOf = (fixed, floor, alt) => {
      if (fixed !== null && fixed !== undefined) return fixed;
      // [value, weight]: each point weighs the time until the next one, so
      // that a stretch of slow answers (few points, each seconds long) counts
      // for the time it lasted, not for its few points.
      const vals = [];
      visible.forEach(([t, vs], i) => {
        const next = i + 1 < visible.length ? visible[i + 1][0] : tNow;
        const weight = Math.min(5_000, Math.max(1, next - t));
        vs.forEach((v, si) => { if (onAlt(si) === alt && Number.isFinite(v)) vals.push([v, weight]); });
      });
      let top = floor;
      if (!alt && this.guide && this.guide.value > top) top = this.guide.value;
      if (vals.length === 0) return niceCeil(top * 1.1);
      vals.sort((a, b) => a[0] - b[0]);
      const largest = vals[vals.length - 1][0];
      // The bulk: the 90th percentile (by time), with room above it. With few
      // points (a chart just started) every point counts.
      let bulk = largest;
      if (vals.length >= 10) {
        const total = vals.reduce((a, [, w]) => a + w, 0);
        let acc = 0;
        for (const [v, w] of vals) { acc += w; if (acc >= total * 0.9) { bulk = v * 2.5; break; } }
      }
      return niceCeil(Math.max(top, Math.min(largest, Math.max(bulk, floor))) * 1.1);
    };
    const max = scaleOf(this.yMax, this.yMaxFloor, false);
    const altMax = this.alt ? scaleOf(this.alt.yMax ?? null, this.alt.yMaxFloor ?? 1, true) : null;
    const x = (t) => padL + ((t - t0) / this.windowMs) * w;
    const y = (v) => padT + h - ((v - min) / (max - min || 1)) * h;
    const yAlt = (v) => padT + h - ((v - min) / ((altMax ?? max) - min || 1)) * h;

    // grid + y labels
    ctx.font = font;
    ctx.lineWidth = 1;
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'left';
    for (let i = 0; i <= 4; i++) {
      const v = min + ((max - min) * i) / 4;
      const yy = Math.round(y(v)) + 0.5;
      ctx.strokeStyle = grid;
      ctx.beginPath();
      ctx.moveTo(padL, yy);
      ctx.lineTo(padL + w, yy);
      ctx.stroke();
      ctx.fillStyle = text;
      ctx.fillText(this.format(v) + (i === 4 && this.unit ? ` ${this.unit}` : ''), padL + w + 6, yy);
      if (this.alt) {
        const altSeries = this.series.find((s) => s.axis === 'alt');
        const av = min + (((altMax ?? max) - min) * i) / 4;
        ctx.textAlign = 'right';
        ctx.fillStyle = altSeries?.color ?? text;
        ctx.fillText(this.format(av), padL - 6, yy);
        ctx.textAlign = 'left';
      }
    }
    // x labels
    ctx.textBaseline = 'alphabetic';
    ctx.textAlign = 'center';
    const secs = this.windowMs / 1000;
    for (const s of [secs, secs / 2, 0]) {
      ctx.fillText(s === 0 ? 'now' : `-${s}s`, Math.min(padL + w - 10, Math.max(padL + 12, x(tNow - s * 1000))), cssH - 4);
    }

    // guide
    if (this.guide && Number.isFinite(this.guide.value)) {
      const gy = y(this.guide.value);
      ctx.save();
      ctx.setLineDash([4, 4]);
      ctx.strokeStyle = text;
      ctx.beginPath();
      ctx.moveTo(padL, gy);
      ctx.lineTo(padL + w, gy);
      ctx.stroke();
      ctx.restore();
    }

    // series
    ctx.save();
    ctx.beginPath();
    ctx.rect(padL, padT - 2, w, h + 4);
    ctx.clip();
    let clipped = 0;
    const peaks = []; // [x, y, value, color] of the largest clipped point per series
    this.series.forEach((s, si) => {
      const top = onAlt(si) ? altMax : max;
      const ys = onAlt(si) ? yAlt : y;
      const pts = [];
      let peak = null;
      for (const [t, vs] of visible) {
        const v = vs[si];
        if (!Number.isFinite(v)) continue;
        if (v > top) {
          clipped++;
          if (!peak || v > peak[2]) peak = [x(t), ys(top), v, s.color];
        }
        pts.push([x(t), ys(Math.min(v, top))]);
      }
      if (peak) peaks.push(peak);
      if (pts.length === 0) return;
      ctx.lineJoin = 'round';
      if (s.fill) {
        ctx.beginPath();
        ctx.moveTo(pts[0][0], ys(min));
        for (const [px, py] of pts) ctx.lineTo(px, py);
        ctx.lineTo(pts[pts.length - 1][0], ys(min));
        ctx.closePath();
        ctx.fillStyle = withAlpha(s.color, 0.12);
        ctx.fill();
      }
      ctx.beginPath();
      pts.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
      ctx.strokeStyle = s.color;
      ctx.lineWidth = s.width ?? 1.75;
      if (s.dash) ctx.setLineDash(s.dash); else ctx.setLineDash([]);
      ctx.stroke();
    });
    ctx.restore();
    // Clipped points: a marker at the top, and the largest value beside it.
    for (const [px, py, v, color] of peaks) {
      ctx.fillStyle = color;
      ctx.beginPath();
      ctx.moveTo(px - 4, py + 1);
      ctx.lineTo(px + 4, py + 1);
      ctx.lineTo(px, py - 5);
      ctx.closePath();
      ctx.fill();
      ctx.font = font;
      ctx.textAlign = px > padL + w - 70 ? 'right' : 'left';
      ctx.textBaseline = 'top';
      ctx.fillText(`▲ ${this.format(v)}${this.unit ? ` ${this.unit}` : ''}`, px + (ctx.textAlign === 'right' ? -6 : 6), py + 2);
    }
    canvas.dataset.clipped = String(clipped);

    // legend with the latest values
    ctx.textAlign = 'left';
    ctx.textBaseline = 'middle';
    let lx = padL;
    const last = visible.length ? visible[visible.length - 1][1] : [];
    this.series.forEach((s, si) => {
      const v = last[si];
      const unit = s.unit ?? this.unit;
      const label = `${s.label} ${Number.isFinite(v) ? this.format(v) + (unit ? ` ${unit}` : '') : '–'}`;
      ctx.fillStyle = s.color;
      ctx.fillRect(lx, 7, 10, 3);
      ctx.fillStyle = text;
      ctx.fillText(label, lx + 14, 9);
      lx += ctx.measureText(label).width + 30;
    });
    if (this.guide?.label) {
      ctx.fillStyle = text;
      ctx.fillText(`┄ ${this.guide.label}`, lx, 9);
    }
  }

  destroy() {
    clearInterval(this._timer);
    this._ro?.disconnect();
  }
}

export function formatNumber(v) {
  if (!Number.isFinite(v)) return '–';
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + 'M';
  if (a >= 1e4) return (v / 1e3).toFixed(a >= 1e5 ? 0 : 1) + 'k';
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1).replace(/\.0$/, '');
  if (a >= 1) return v.toFixed(2).replace(/\.?0+$/, '');
  if (a === 0) return '0';
  return v.toFixed(2);
}

function niceCeil(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function withAlpha(hex, a) {
  const m = /^#([0-9a-f]{6})$/i.exec(hex);
  if (!m) return hex;
  const n = parseInt(m[1], 16);
  return `rgba(${n >> 16},${(n >> 8) & 255},${n & 255},${a})`;
}
