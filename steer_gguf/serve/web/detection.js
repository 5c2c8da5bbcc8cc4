// The detection view: a `detect` table (read by the server, as the CLI reads it, or made there
// by `detect` on a built-in or uploaded pair dataset) as a layer x expert heatmap of its ranking
// statistic, its verdict and the top of its ranking with intervals; the top N go to the board by
// `profile make`'s own rule (on the server).
import { getJSON, postJSON } from "./api.js";
import { saveText } from "./save.js";
import { AXIS, LABEL, cellOf, layerExpertFrame } from "./grid.js";

const $ = (id) => document.getElementById(id);
const TOP_ROWS = 20;

export class DetectionView {
  constructor(ui) {
    this.ui = ui;
    this.canvas = $("detect-canvas");
    this.table = null;
    this.csv = null;
    this.running = false;
    $("detect-file").onchange = (ev) => {
      const f = ev.target.files[0];
      ev.target.value = "";
      if (f) this.open(f).catch((e) => this.ui.report(e));
    };
    $("detect-to-board").onclick = () => this.toBoard().catch((e) => this.ui.report(e));
    $("detect-download").onclick = () => this.download();
    $("detect-run").onclick = () => this.run({ dataset: $("detect-dataset").value }).catch((e) => this.ui.report(e));
    $("detect-pairs").onchange = (ev) => {
      const f = ev.target.files[0];
      ev.target.value = "";
      if (f) f.text().then((t) => this.run({ name: f.name, jsonl: t })).catch((e) => this.ui.report(e));
    };
    this.canvas.addEventListener("mousemove", (ev) => this.hover(ev));
  }

  setModel(model) {
    this.model = model;
    getJSON("/v1/steer/datasets").then((d) => {
      const sel = $("detect-dataset");
      sel.textContent = "";
      for (const name of d.datasets) sel.add(new Option(name, name));
      $("detect-max-pairs").max = String(d.max_pairs);
    }).catch((e) => this.ui.report(e));
  }

  // detect on the server: the model answers nothing else until it is done
  async run(body) {
    const n = Number($("detect-max-pairs").value);
    if (n) body.max_pairs = n;
    const button = $("detect-run"), status = $("detect-status");
    button.disabled = true;
    status.textContent = `detecting on ${body.dataset || body.name} (the model answers nothing else meanwhile)...`;
    this.running = true;
    try {
      const table = await postJSON("/v1/steer/detect", body);
      this.show(table, table.csv);
      status.textContent = "";
    } catch (e) {
      status.textContent = "";
      throw e;
    } finally {
      button.disabled = false;
      this.running = false;
    }
  }

  download() {
    if (!this.table) return;
    saveText(this.table.name, this.csv, "text/csv");
    this.ui.showMessage(`downloaded ${this.table.name}`, "info");
  }

  async open(file) {
    const text = await file.text();
    this.show(await postJSON("/v1/steer/detection", { name: file.name, csv: text }), text);
  }

  show(table, csv) {
    this.table = table;
    this.csv = csv;
    const L = table.layers.length;
    const index = new Map(table.layers.map((l, j) => [l, j]));
    this.grid = new Float64Array(L * table.n_expert);
    this.rank = new Int32Array(L * table.n_expert);
    const r = table.rows;
    r.layer.forEach((l, i) => {
      const c = index.get(l) * table.n_expert + r.expert[i];
      this.grid[c] = r.score[i];
      this.rank[c] = i;
    });
    this.maxAbs = Math.max(1e-9, ...r.score.map((x) => Math.abs(x)));
    const v = $("detect-verdict");
    v.textContent = "";
    const line = document.createElement("div");
    const meta = table.meta;
    line.textContent = `${table.name}: ${table.method}, ${L} layers x ${table.n_expert} experts` +
      (meta.dataset ? `, ${meta.dataset}` : "") + (meta.pairs ? `, ${meta.pairs} pairs` : "");
    const verdict = document.createElement("div");
    verdict.className = "verdict";
    verdict.textContent = table.verdict ? `verdict: ${table.verdict}` : "verdict: none recorded (detect writes one)";
    v.append(line, verdict);
    if (table.warning) this.ui.showMessage(`${table.name}: ${table.warning}`);
    this.topTable();
    $("detect-to-board").disabled = false;
    $("detect-download").disabled = false;
    this.draw();
  }

  topTable() {
    const t = this.table, r = t.rows;
    const tab = $("detect-top");
    tab.textContent = "";
    const head = tab.insertRow();
    for (const h of ["rank", "layer", "expert", t.method === "risk_diff" ? "risk_diff" : "effect", "95% interval", "conf"]) {
      const th = document.createElement("th");
      th.textContent = h;
      head.append(th);
    }
    const f = (x, d = 3) => (x === null ? "" : (x >= 0 ? "+" : "") + x.toFixed(d));
    for (let i = 0; i < Math.min(TOP_ROWS, r.layer.length); i++) {
      const row = tab.insertRow();
      const iv = r.lo[i] === null ? "" : `[${f(r.lo[i])}, ${f(r.hi[i])}]`;
      for (const cell of [i + 1, r.layer[i], r.expert[i], f(r.score[i], 4), iv, r.conf[i] === null ? "" : r.conf[i].toFixed(3)]) {
        row.insertCell().textContent = String(cell);
      }
    }
  }

  async toBoard() {
    if (!this.table) return;
    const body = { name: this.table.name, csv: this.csv, activate: Number($("detect-n-on").value) || 0,
                   deactivate: Number($("detect-n-off").value) || 0, reverse: $("detect-reverse").checked };
    const res = await postJSON("/v1/steer/detection/profile", body);
    this.ui.board.fromProfile(res.profile);
    this.ui.showMessage(`board: ${res.summary}`, "info");
    this.ui.showView("board");
  }

  geometry() {
    const t = this.table;
    const wrap = this.canvas.parentElement.clientWidth || 800;
    const cw = Math.max(4, Math.min(28, Math.floor((wrap - LABEL - 4) / t.n_expert)));
    return { cw, ch: Math.max(8, Math.min(24, cw)) };
  }

  draw() {
    const t = this.table;
    if (!t) return;
    const { cw, ch } = this.geometry();
    const L = t.layers.length;
    const ctx = layerExpertFrame(this.canvas, t.layers, t.n_expert, cw, ch);
    // diverging: behavior 1 (positive) blue, behavior 2 (negative) orange, by |score| / max
    for (let j = 0; j < L; j++) for (let e = 0; e < t.n_expert; e++) {
      const v = this.grid[j * t.n_expert + e] / this.maxAbs;
      const a = Math.min(1, Math.abs(v));
      ctx.fillStyle = v >= 0 ? `rgba(47,111,179,${a})` : `rgba(232,120,40,${a})`;
      ctx.fillRect(LABEL + e * cw, AXIS + j * ch, cw - (cw > 5 ? 1 : 0), ch - 1);
    }
  }

  hover(ev) {
    const t = this.table;
    if (!t) return;
    const { cw, ch } = this.geometry();
    const c = cellOf(this.canvas, ev, t.layers.length, t.n_expert, cw, ch);
    if (!c) return;
    const { j, e } = c;
    const i = this.rank[j * t.n_expert + e], rows = t.rows;
    const iv = rows.lo[i] === null ? "" : `, 95% interval [${rows.lo[i].toFixed(3)}, ${rows.hi[i].toFixed(3)}]`;
    $("detect-hover").textContent = `layer ${t.layers[j]}, expert ${e}: ${rows.score[i].toFixed(4)} (rank ${i + 1})${iv}`;
  }
}
