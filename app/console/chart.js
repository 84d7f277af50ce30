// A small line chart on <canvas>: x = training step, y = a metric. Hand-written so nothing is fetched or vendored.

/** Enough significant digits that the two axis labels differ when the range is narrow (an LR decaying slowly). */
function fmt(v, span) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  const digits = Math.min(8, Math.max(2, Math.ceil(Math.log10(a / Math.max(span, 1e-300))) + 1));
  return a >= 1000 || a < 0.01 ? v.toExponential(digits - 1) : v.toPrecision(digits + 1);
}

/**
 * Draws `points` ([[step, value], ...]) into `canvas`, scaled to its CSS size and the device pixel ratio.
 * The point count is kept in canvas.dataset.points (tests and people can read how much is plotted).
 */
export function drawChart(canvas, points, { label, color = "#2563eb", logY = false } = {}) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 220;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const style = getComputedStyle(canvas);
  const ink = style.color || "#222";
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = ink;
  ctx.fillText(label, 8, 14);
  canvas.dataset.points = String(points.length);
  const ys = points.map(([, y]) => (logY ? Math.log10(Math.max(y, 1e-12)) : y)).filter(Number.isFinite);
  if (points.length === 0 || ys.length === 0) {
    ctx.fillText("waiting for metrics…", 8, h / 2);
    return;
  }
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-12) { y0 -= 0.5; y1 += 0.5; }
  const unlog = (v) => (logY ? 10 ** v : v);
  const span = Math.abs(unlog(y1) - unlog(y0));
  const top = fmt(unlog(y1), span), bottom = fmt(unlog(y0), span);
  const pad = { l: Math.max(ctx.measureText(top).width, ctx.measureText(bottom).width) + 12, r: 10, t: 22, b: 22 };
  const x0 = points[0][0], x1 = Math.max(points[points.length - 1][0], x0 + 1);
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const Y = (y) => h - pad.b - ((y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  ctx.strokeStyle = "rgba(128,128,128,0.5)";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(pad.l, pad.t);
  ctx.lineTo(pad.l, h - pad.b);
  ctx.lineTo(w - pad.r, h - pad.b);
  ctx.stroke();
  ctx.fillText(top, 4, pad.t + 8);
  ctx.fillText(bottom, 4, h - pad.b);
  ctx.fillText(`step ${x0}`, pad.l, h - 6);
  const right = `step ${points[points.length - 1][0]}`;
  ctx.fillText(right, w - pad.r - ctx.measureText(right).width, h - 6);
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach(([x, y], i) => {
    const yy = logY ? Math.log10(Math.max(y, 1e-12)) : y;
    if (i === 0) ctx.moveTo(X(x), Y(yy));
    else ctx.lineTo(X(x), Y(yy));
  });
  ctx.stroke();
  if (points.length === 1) {
    ctx.fillStyle = color;
    ctx.fillRect(X(points[0][0]) - 2, Y(ys[0]) - 2, 4, 4);
  }
}
