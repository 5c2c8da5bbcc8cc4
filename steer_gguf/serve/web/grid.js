// The frame the board and the detection heatmap share: a layer x expert grid on a canvas,
// expert numbers above, layer names at the left.
export const LABEL = 64, AXIS = 16;

// Sizes the canvas and draws the frame; returns its 2D context for the cells.
export function layerExpertFrame(canvas, layers, nExpert, cw, ch) {
  canvas.width = LABEL + nExpert * cw + 1;
  canvas.height = AXIS + layers.length * ch + 1;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#6b7075";
  const every = Math.ceil(22 / cw);  // numbers never overlap
  for (let e = 0; e < nExpert; e += every) ctx.fillText(String(e), LABEL + e * cw + 1, 11);
  const lEvery = Math.ceil(11 / ch);
  layers.forEach((l, j) => { if (j % lEvery === 0) ctx.fillText(`layer ${l}`, 2, AXIS + j * ch + Math.min(ch, 11)); });
  return ctx;
}

// The cell under a mouse event: {j (row), e (expert)} or null.
export function cellOf(canvas, ev, nRows, nExpert, cw, ch) {
  const r = canvas.getBoundingClientRect();
  const x = ev.clientX - r.left - LABEL, y = ev.clientY - r.top - AXIS;
  const e = Math.floor(x / cw), j = Math.floor(y / ch);
  return x < 0 || y < 0 || e >= nExpert || j >= nRows ? null : { j, e };
}
