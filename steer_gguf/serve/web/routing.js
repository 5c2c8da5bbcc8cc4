// The routing view: a token x MoE-layer grid on one canvas. The whole grid lives in an
// offscreen image of one pixel per cell (2,000 x 48 is 96,000 pixels), drawn scaled into a
// canvas the size of the visible part: a scroll or a zoom is one drawImage, and no cell is
// ever a DOM element.
import { postJSON } from "./api.js";

const $ = (id) => document.getElementById(id);
const AXIS = 16;   // px above the grid for token numbers
const COLORS = {
  forced: [46, 157, 79], forcedOff: [208, 69, 58], missed: [232, 160, 40], unsteered: [236, 236, 236],
  avoided: [160, 214, 170], chosen: [47, 111, 179], empty: [246, 246, 246], diff: [208, 69, 58], pending: [210, 210, 210],
};
const rgba = (c, a = 255) => (a << 24) | (c[2] << 16) | (c[1] << 8) | c[0];  // little-endian ImageData words

export class RoutingView {
  constructor(ui) {
    this.ui = ui;
    this.scroll = $("routing-scroll");
    this.canvas = $("routing-canvas");
    this.labels = $("routing-labels");
    this.spacer = $("routing-spacer");
    this.off = document.createElement("canvas");  // never attached: the one-pixel-per-cell image
    this.cellW = Number($("routing-zoom").value);
    this.data = null;
    this.stats = { computeMs: 0, drawMs: [], draws: 0 };
    this.pending = false;
    this.scroll.addEventListener("scroll", () => this.schedule(), { passive: true });
    window.addEventListener("resize", () => this.resize());
    $("routing-mode").onchange = () => this.recompute();
    $("routing-expert").onchange = () => this.recompute();
    $("routing-zoom").oninput = () => { this.setZoom(Number($("routing-zoom").value)); };
    $("routing-answer").onchange = () => {
      const a = this.ui.answers.find((x) => String(x.id) === $("routing-answer").value);
      if (a) this.show(a);
    };
    this.canvas.addEventListener("mousemove", (ev) => this.hover(ev));
  }

  setModel(model) {
    this.model = model;
    $("routing-expert").max = model.n_expert - 1;
  }

  listAnswers() {
    const sel = $("routing-answer");
    const keep = sel.value;
    sel.textContent = "";
    for (const a of this.ui.answers) {
      if (!a.trace) continue;
      const words = a.text.slice(0, 40).replace(/\s+/g, " ");
      sel.add(new Option(`#${a.id} [${a.label}] ${words}`, String(a.id)));
    }
    if (keep) sel.value = keep;
  }

  // An answer from the chat: its steer_trace now, then (traced again on the server) the
  // weights and token text, and the unsteered routing of the same tokens for "difference".
  async show(answer) {
    this.listAnswers();
    $("routing-answer").value = String(answer.id);
    this.answer = answer;
    let rules = null;
    try {
      rules = await this.ui.profileRules(answer.spec);
    } catch (e) { this.ui.report(e); }
    this.showTrace(answer.trace, rules);
    const token = this.data;
    token.retracing = true;
    this.status("tracing again for the weights and the unsteered routing…");
    const ask = (spec) => postJSON("/v1/steer/trace", { messages: answer.messages, tokens: answer.trace.tokens,
                                                          steer_profile: spec });
    try {
      const [own, none] = await Promise.all([ask(answer.spec), ask("none")]);
      if (this.data !== token) return;  // another answer was opened meanwhile
      this.setRetrace(own, none);
      this.status("");
    } catch (e) {
      token.retracing = false;
      this.status("no weights or unsteered routing: " + e.message);
      this.ui.report(e);
    }
  }

  status(text) { $("routing-status").textContent = text; }

  // trace: {layers, tokens, experts[T][L][k]} (steer_trace); rules: a profile dict or null.
  showTrace(trace, rules = null, extra = {}) {
    const t0 = performance.now();
    const T = trace.experts.length, L = trace.layers.length;
    let k = 0;
    for (const row of trace.experts) for (const l of row) k = Math.max(k, l.length);
    const experts = new Int16Array(T * L * k).fill(-1);
    trace.experts.forEach((row, t) => row.forEach((l, j) => l.forEach((e, i) => { experts[(t * L + j) * k + i] = e; })));
    this.data = { T, L, k, layers: trace.layers, tokens: trace.tokens, experts, weights: null, pieces: extra.pieces || null,
                  unsteered: null, rules: this.indexRules(rules, trace.layers) };
    if (extra.weights) this.data.weights = this.flatWeights(extra.weights, experts, extra.experts || trace.experts);
    this.recompute();
    this.stats.showMs = performance.now() - t0;
    return this.stats.showMs;
  }

  setRetrace(own, none) {
    const d = this.data;
    const flatten = (rows) => {
      const out = new Int16Array(d.T * d.L * d.k).fill(-1);
      rows.forEach((row, t) => row.forEach((l, j) => l.forEach((e, i) => { if (i < d.k) out[(t * d.L + j) * d.k + i] = e; })));
      return out;
    };
    d.retracing = false;
    d.pieces = own.pieces;
    d.weights = this.flatWeights(own.weights, d.experts, own.experts);
    d.unsteered = flatten(none.experts);
    this.recompute();
  }

  // The weight of each chosen expert, looked up by expert id in the retraced row (its order may differ).
  flatWeights(weights, experts, retraced) {
    const d = this.data;
    const w = new Float32Array(d.T * d.L * d.k);
    for (let t = 0; t < d.T; t++) for (let j = 0; j < d.L; j++) {
      const ids = retraced[t]?.[j] || [], ws = weights[t]?.[j] || [];
      for (let i = 0; i < d.k; i++) {
        const at = ids.indexOf(experts[(t * d.L + j) * d.k + i]);
        w[(t * d.L + j) * d.k + i] = at >= 0 ? ws[at] : NaN;
      }
    }
    return w;
  }

  indexRules(p, layers) {
    if (!p) return null;
    const on = layers.map(() => new Set()), off = layers.map(() => new Set());
    const at = new Map(layers.map((l, j) => [l, j]));
    for (const r of p.experts || []) {
      const j = at.get(r.layer);
      if (j !== undefined) (r.action === "activate" ? on : off)[j].add(r.expert);
    }
    return { on, off, name: p.name };
  }

  mode() { return $("routing-mode").value; }

  // values per cell for the current mode into the one-pixel image; marks (forced mode) kept for tests:
  // 1 a forced-on expert was chosen, -1 a forced-off one was, 0 a layer with forced-on experts none of which
  // was chosen, 3 a layer with only forced-off experts, none chosen, 2 a layer the profile does not force
  recompute() {
    const d = this.data;
    if (!d) return;
    const t0 = performance.now();
    const { T, L, k, experts } = d;
    const mode = this.mode();
    const img = new ImageData(Math.max(T, 1), Math.max(L, 1));
    const px = new Uint32Array(img.data.buffer);
    const marks = new Int8Array(T * L);
    const values = new Float32Array(T * L);
    const E = Number($("routing-expert").value);
    for (let t = 0; t < T; t++) {
      for (let j = 0; j < L; j++) {
        const c = t * L + j, base = c * k;
        let color;
        if (mode === "forced") {
          const on = d.rules?.on[j], off = d.rules?.off[j];
          let m = on && on.size ? 0 : off && off.size ? 3 : 2;
          for (let i = 0; i < k; i++) {
            const e = experts[base + i];
            if (e < 0) continue;
            if (off && off.has(e)) { m = -1; break; }
            if (on && on.has(e)) m = 1;
          }
          marks[c] = m;
          values[c] = m;
          color = m === 1 ? rgba(COLORS.forced) : m === -1 ? rgba(COLORS.forcedOff) : m === 0 ? rgba(COLORS.missed)
            : m === 3 ? rgba(COLORS.avoided) : rgba(COLORS.unsteered);
        } else if (mode === "expert") {
          // darker: a larger share of the token's experts' weight in that layer (top-8 weights
          // of 0.1 would be invisible on an absolute scale)
          let v = 0, top = 0;
          if (d.weights) for (let i = 0; i < k; i++) if (d.weights[base + i] > top) top = d.weights[base + i];
          for (let i = 0; i < k; i++) {
            if (experts[base + i] !== E) continue;
            const w = d.weights ? d.weights[base + i] : NaN;
            v = Number.isNaN(w) || !(top > 0) ? 1 : 0.25 + 0.75 * w / top;
          }
          values[c] = v;
          color = v > 0 ? rgba(COLORS.chosen, Math.round(255 * v)) : rgba(COLORS.empty);
        } else {
          if (!d.unsteered) { values[c] = NaN; color = rgba(COLORS.pending); } else {
            let n = 0, used = 0;
            for (let i = 0; i < k; i++) {
              const e = experts[base + i];
              if (e < 0) continue;
              used++;
              let found = false;
              for (let q = 0; q < k; q++) if (d.unsteered[base + q] === e) { found = true; break; }
              if (!found) n++;
            }
            const v = used ? n / used : 0;
            values[c] = v;
            color = v > 0 ? rgba(COLORS.diff, Math.round(40 + 215 * v)) : rgba(COLORS.empty);
          }
        }
        px[j * T + t] = color;
      }
    }
    this.off.width = Math.max(T, 1);
    this.off.height = Math.max(L, 1);
    this.off.getContext("2d").putImageData(img, 0, 0);
    d.marks = marks;
    d.values = values;
    d.mode = mode;
    this.stats.computeMs = performance.now() - t0;
    this.legend(mode);
    this.resize();
  }

  legend(mode) {
    const items = {
      forced: [[COLORS.forced, "a forced-on expert chosen"], [COLORS.missed, "steered layer, none chosen"],
               [COLORS.forcedOff, "a forced-off expert chosen"],
               [COLORS.avoided, "forced-off experts avoided"], [COLORS.unsteered, "layer not steered"]],
      expert: [[COLORS.chosen, `expert ${$("routing-expert").value} chosen (darker: more of the token's weight in that layer)`], [COLORS.empty, "not chosen"]],
      diff: [[COLORS.diff, "experts unsteered routing would not choose (darker: more)"], [COLORS.empty, "same as unsteered"],
             [COLORS.pending, "unsteered routing not known yet"]],
    }[mode];
    const box = $("routing-legend");
    box.textContent = "";
    for (const [c, text] of items) {
      const s = document.createElement("span");
      const i = document.createElement("i");
      i.style.background = `rgb(${c.join(",")})`;
      s.append(i, text);
      box.append(s);
    }
  }

  rowH() { return this.data ? Math.max(6, Math.min(18, Math.floor(480 / this.data.L))) : 10; }

  setZoom(w) {
    const d = this.data;
    const centre = d ? (this.scroll.scrollLeft + this.scroll.clientWidth / 2) / this.cellW : 0;
    this.cellW = w;
    this.resize();
    if (d) this.scroll.scrollLeft = centre * w - this.scroll.clientWidth / 2;
  }

  resize() {
    const d = this.data;
    if (!d) return;
    const h = AXIS + d.L * this.rowH();
    this.spacer.style.width = `${d.T * this.cellW}px`;
    const w = Math.max(1, this.scroll.clientWidth);
    if (this.canvas.width !== w || this.canvas.height !== h) { this.canvas.width = w; this.canvas.height = h; }
    this.drawLabels(h);
    this.draw();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  draw() {
    const d = this.data;
    if (!d) return;
    const t0 = performance.now();
    const ctx = this.canvas.getContext("2d");
    const W = this.canvas.width, rh = this.rowH(), cw = this.cellW;
    ctx.clearRect(0, 0, W, this.canvas.height);
    const first = Math.floor(this.scroll.scrollLeft / cw);
    const shift = -(this.scroll.scrollLeft - first * cw);
    const n = Math.min(d.T - first, Math.ceil(W / cw) + 1);
    if (n > 0) {
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(this.off, first, 0, n, d.L, shift, AXIS, n * cw, d.L * rh);
      // token numbers: a tick every so many tokens that labels never overlap
      ctx.fillStyle = "#6b7075";
      ctx.font = "10px sans-serif";
      const every = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000].find((s) => s * cw >= 40) || 1000;
      for (let t = Math.ceil(first / every) * every; t < first + n; t += every) {
        const x = shift + (t - first) * cw;
        ctx.fillRect(x, AXIS - 4, 1, 4);
        ctx.fillText(String(t), x + 2, 10);
      }
      if (cw >= 6 && rh >= 6) {  // cell borders only where cells are big enough to see them
        ctx.fillStyle = "#ffffff";
        for (let i = 0; i <= n; i++) ctx.fillRect(shift + i * cw, AXIS, 1, d.L * rh);
        for (let j = 0; j <= d.L; j++) ctx.fillRect(0, AXIS + j * rh, W, 1);
      }
    }
    const ms = performance.now() - t0;
    this.stats.draws++;
    this.stats.drawMs.push(ms);
    if (this.stats.drawMs.length > 600) this.stats.drawMs.shift();
  }

  drawLabels(h) {
    const d = this.data, rh = this.rowH();
    const c = this.labels;
    c.height = h;
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, h);
    ctx.fillStyle = "#6b7075";
    ctx.font = `${Math.min(11, rh)}px sans-serif`;
    const every = Math.ceil(11 / rh);
    for (let j = 0; j < d.L; j += every) ctx.fillText(`layer ${d.layers[j]}`, 2, AXIS + j * rh + Math.min(11, rh) - 1);
  }

  // The cell under the pointer, and what the inspector lists: every layer's experts for that token.
  cellAt(x, y) {
    const d = this.data;
    if (!d) return null;
    const t = Math.floor((x + this.scroll.scrollLeft) / this.cellW), j = Math.floor((y - AXIS) / this.rowH());
    return t >= 0 && t < d.T && j >= 0 && j < d.L ? { t, j } : null;
  }

  // Where cell (t, layer index j) is drawn, in canvas pixels (after scrolling it into view).
  cellCenter(t, j) {
    const x = t * this.cellW + this.cellW / 2;
    if (x < this.scroll.scrollLeft || x >= this.scroll.scrollLeft + this.scroll.clientWidth) {
      this.scroll.scrollLeft = Math.max(0, x - this.scroll.clientWidth / 2);
      this.draw();
    }
    return { x: Math.floor(x - this.scroll.scrollLeft), y: Math.floor(AXIS + j * this.rowH() + this.rowH() / 2) };
  }

  cell(t, j) {
    const d = this.data, base = (t * d.L + j) * d.k;
    const ids = [], ws = [];
    for (let i = 0; i < d.k; i++) {
      if (d.experts[base + i] < 0) continue;
      ids.push(d.experts[base + i]);
      ws.push(d.weights ? d.weights[base + i] : null);
    }
    return { experts: ids, weights: ws, mark: d.marks?.[t * d.L + j], value: d.values?.[t * d.L + j] };
  }

  hover(ev) {
    const r = this.canvas.getBoundingClientRect();
    const at = this.cellAt(ev.clientX - r.left, ev.clientY - r.top);
    if (!at) return;
    this.inspect(at.t, at.j);
  }

  inspect(t, jHover) {
    const d = this.data;
    const piece = d.pieces ? JSON.stringify(d.pieces[t]) : `token id ${d.tokens[t]}`;
    const lines = [`token ${t}: ${piece}` + (d.weights ? "" : d.retracing ? "  (weights: tracing…)" : "  (no weights)")];
    for (let j = 0; j < d.L; j++) {
      const c = this.cell(t, j);
      const parts = c.experts.map((e, i) => {
        let s = String(e);
        if (c.weights[i] !== null && !Number.isNaN(c.weights[i])) s += ` ${c.weights[i].toFixed(3)}`;
        if (d.rules?.on[j].has(e)) s += " forced";
        if (d.unsteered) {
          let found = false;
          for (let q = 0; q < d.k; q++) if (d.unsteered[(t * d.L + j) * d.k + q] === e) found = true;
          if (!found) s += " new";
        }
        return s;
      });
      lines.push(`${j === jHover ? ">" : " "} layer ${String(d.layers[j]).padStart(3)}: ${parts.join(", ")}`);
    }
    $("routing-inspector").textContent = lines.join("\n");
    $("routing-inspector").classList.remove("muted");
  }
}
