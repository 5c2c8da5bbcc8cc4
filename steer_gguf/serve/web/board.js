// The expert board: one canvas cell per (MoE layer, expert); a click applies the chosen tool.
// The board is a profile: it runs as a request's steer_profile, downloads as a profile file
// (checked by the server as `profile validate --model` checks it) and loads from one.
import { postJSON } from "./api.js";
import { AXIS, LABEL, cellOf, layerExpertFrame } from "./grid.js";
import { saveText } from "./save.js";

const $ = (id) => document.getElementById(id);
const FORMAT = "steer-gguf.profile/1", FORMAT_TOPK = "steer-gguf.profile/2";

export class Board {
  constructor(ui) {
    this.ui = ui;
    this.canvas = $("board-canvas");
    this.rules = new Map();       // "layer,expert" -> {action?: "activate"|"deactivate", bias?: number}
    this.carry = {};              // what a loaded profile had that the board does not edit: eps, topk, provenance
    this.model = null;
    this.canvas.addEventListener("click", (ev) => this.click(ev));
    this.canvas.addEventListener("mousemove", (ev) => this.hover(ev));
  }

  bindControls() {
    $("board-run").onclick = () => this.run();
    $("board-download").onclick = () => this.download().catch((e) => this.ui.report(e));
    $("board-file").onchange = (ev) => {
      const f = ev.target.files[0];
      ev.target.value = "";
      if (f) this.loadFile(f).catch((e) => this.ui.report(e));
    };
    $("board-load-server").onclick = () => this.loadServer($("board-server-profile").value).catch((e) => this.ui.report(e));
    $("board-clear").onclick = () => { this.rules.clear(); this.carry = {}; this.changed(); };
  }

  setModel(model) {
    this.model = model;
    this.draw();
    this.summarize();
  }

  name() { return $("board-name").value.trim() || "board"; }

  tool() { return document.querySelector("input[name=board-tool]:checked").value; }

  // ---- editing ---------------------------------------------------------------------------------
  apply(layer, expert, tool = this.tool(), allLayers = $("board-all-layers").checked) {
    const m = this.model;
    const layers = allLayers ? m.moe_layers.filter((l) => !m.fixed_layers.includes(l)) : [layer];
    for (const l of layers) {
      const key = `${l},${expert}`;
      const r = { ...(this.rules.get(key) || {}) };
      if (tool === "clear") { this.rules.delete(key); continue; }
      if (tool === "bias") {
        const v = Number($("board-bias").value);
        if (!Number.isFinite(v)) { this.ui.showMessage("bias: not a number"); return; }
        if (v === 0) delete r.bias; else r.bias = v;
      } else {
        r.action = r.action === tool ? undefined : tool;  // a second click takes it back
        if (!r.action) delete r.action;
      }
      if (r.action || r.bias !== undefined) this.rules.set(key, r); else this.rules.delete(key);
    }
    this.changed();
  }

  changed() {
    this.draw();
    this.summarize();
  }

  counts() {
    let on = 0, off = 0, bias = 0;
    const layers = new Set();
    for (const [key, r] of this.rules) {
      if (r.action === "activate") on++;
      if (r.action === "deactivate") off++;
      if (r.bias !== undefined) bias++;
      layers.add(key.split(",")[0]);
    }
    return { on, off, bias, layers: layers.size };
  }

  summarize() {
    const c = this.counts();
    const extra = this.carry.topk !== undefined ? `; topk ${JSON.stringify(this.carry.topk)} (from the loaded profile)` : "";
    $("board-summary").textContent = `${c.on} activated, ${c.off} deactivated, ${c.bias} biased, in ${c.layers} layers${extra}`;
  }

  // ---- as a profile ----------------------------------------------------------------------------
  toProfile() {
    const m = this.model;
    if (!m) throw new Error("not connected");
    const keys = [...this.rules.keys()].map((k) => k.split(",").map(Number)).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    const experts = [], bias = [];
    for (const [layer, expert] of keys) {
      const r = this.rules.get(`${layer},${expert}`);
      if (r.action) experts.push({ layer, expert, action: r.action });
      if (r.bias !== undefined) bias.push({ layer, expert, value: r.bias });
    }
    const p = { format: this.carry.topk !== undefined ? FORMAT_TOPK : FORMAT, name: this.name(),
                model: { n_expert_used: m.n_expert_used, architecture: m.architecture, n_layer: m.n_layer,
                         n_expert: m.n_expert, fingerprint: m.fingerprint },
                eps: this.carry.eps ?? 0.01, experts, bias };
    if (this.carry.topk !== undefined) p.topk = this.carry.topk;
    p.provenance = { ...(this.carry.provenance || {}), method: "board", description: "made on steer-gguf's expert board" };
    return p;
  }

  fromProfile(p) {
    this.rules.clear();
    for (const r of p.experts || []) this.rules.set(`${r.layer},${r.expert}`, { action: r.action });
    for (const b of p.bias || []) {
      if (b.value === 0) continue;
      const key = `${b.layer},${b.expert}`;
      this.rules.set(key, { ...(this.rules.get(key) || {}), bias: b.value });
    }
    this.carry = { eps: p.eps, provenance: p.provenance };
    if (p.topk !== undefined && p.topk !== null) this.carry.topk = p.topk;
    $("board-name").value = p.name || "board";
    this.changed();
  }

  async checked(p) {
    return (await postJSON("/v1/steer/profile/check", p)).profile;  // the server's error says what is wrong
  }

  async download() {
    const p = await this.checked(this.toProfile());
    const name = `${p.name.replace(/[^\w.-]+/g, "_") || "board"}.json`;
    saveText(name, JSON.stringify(p, null, 2) + "\n", "application/json");
    this.ui.showMessage(`downloaded ${name}`, "info");
  }

  async loadFile(file) {
    let data;
    try {
      data = JSON.parse(await file.text());
    } catch (e) {
      throw new Error(`${file.name}: not a JSON file (${e.message})`);
    }
    try {
      this.fromProfile(await this.checked(data));
    } catch (e) {
      e.message = `${file.name}: ${e.message}`;
      throw e;
    }
    this.ui.showMessage(`loaded ${file.name} into the board`, "info");
  }

  async loadServer(name) {
    this.fromProfile(await this.ui.profileRules(name));
  }

  run() {
    const B = this.ui.BOARD;
    if (this.ui.chat.replay($("board-compare").checked ? { a: "none", b: B } : { a: B })) this.ui.showView("chat");
  }

  // ---- drawing ---------------------------------------------------------------------------------
  geometry() {
    const m = this.model;
    const wrap = this.canvas.parentElement.clientWidth || 800;
    const cw = Math.max(8, Math.min(28, Math.floor((wrap - LABEL - 4) / m.n_expert)));
    const ch = Math.max(10, Math.min(24, cw));
    return { cw, ch, rows: m.moe_layers };
  }

  // Where (layer, expert) is drawn, in canvas pixels.
  cellCenter(layer, expert) {
    const { cw, ch, rows } = this.geometry();
    return { x: LABEL + expert * cw + cw / 2, y: AXIS + rows.indexOf(layer) * ch + ch / 2 };
  }

  cellAt(ev) {
    if (!this.model) return null;
    const { cw, ch, rows } = this.geometry();
    const c = cellOf(this.canvas, ev, rows.length, this.model.n_expert, cw, ch);
    return c && { layer: rows[c.j], expert: c.e };
  }

  click(ev) {
    const c = this.cellAt(ev);
    if (!c) return;
    if (this.model.fixed_layers.includes(c.layer)) {
      this.ui.showMessage(`layer ${c.layer} is hash-routed: its experts come from a fixed table, a profile cannot change them`);
      return;
    }
    this.apply(c.layer, c.expert);
  }

  hover(ev) {
    const c = this.cellAt(ev);
    if (!c) return;
    const r = this.rules.get(`${c.layer},${c.expert}`) || {};
    const what = [r.action, r.bias !== undefined ? `bias ${r.bias > 0 ? "+" : ""}${r.bias}` : null].filter(Boolean).join(", ");
    $("board-hover").textContent = `layer ${c.layer}, expert ${c.expert}: ${what || "not steered"}`;
  }

  draw() {
    const m = this.model;
    if (!m) return;
    const { cw, ch, rows } = this.geometry();
    const ctx = layerExpertFrame(this.canvas, rows, m.n_expert, cw, ch);
    const maxBias = Math.max(1, ...[...this.rules.values()].map((r) => Math.abs(r.bias || 0)));
    rows.forEach((l, j) => {
      const fixed = m.fixed_layers.includes(l);
      for (let e = 0; e < m.n_expert; e++) {
        const r = this.rules.get(`${l},${e}`) || {};
        let fill = fixed ? "#d6d6d6" : "#f3f4f5";
        if (r.bias !== undefined) {
          const a = 0.25 + 0.75 * Math.min(1, Math.abs(r.bias) / maxBias);
          fill = r.bias > 0 ? `rgba(47,111,179,${a})` : `rgba(232,160,40,${a})`;
        }
        if (r.action === "activate") fill = "#2e9d4f";
        if (r.action === "deactivate") fill = "#d0453a";
        ctx.fillStyle = fill;
        ctx.fillRect(LABEL + e * cw + 1, AXIS + j * ch + 1, cw - 1, ch - 1);
        if (r.action && r.bias !== undefined) {  // both: a corner in the bias colour
          ctx.fillStyle = r.bias > 0 ? "#2f6fb3" : "#e8a028";
          ctx.fillRect(LABEL + e * cw + 1, AXIS + j * ch + 1, Math.max(2, cw / 3), Math.max(2, ch / 3));
        }
      }
    });
  }
}
