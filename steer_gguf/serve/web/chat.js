// Streaming chat, one column per profile: with compare on, each prompt goes to both columns
// at once with the same seed and settings, each under its own profile (the server decodes them
// together, each with its own per-request profile).
import { stream } from "./api.js";

const $ = (id) => document.getElementById(id);
let nextId = 1;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

export class Chat {
  constructor(ui) {
    this.ui = ui;
    this.answers = [];          // every answer: {id, side, value, label, spec, messages, text, trace, error, done}
    this.history = { a: [], b: [] };
    this.last = null;             // the last prompt asked and the turns before it
    this.controller = null;
    ui.answers = this.answers;
    $("chat-form").onsubmit = (ev) => { ev.preventDefault(); this.send(); };
    $("prompt").onkeydown = (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); this.send(); }
    };
    $("stop").onclick = () => this.controller?.abort();
    $("clear-chat").onclick = () => this.clear();
  }

  clear() {
    this.history = { a: [], b: [] };
    $("col-a").textContent = "";
    $("col-b").textContent = "";
  }

  settings() {
    const num = (id) => { const v = $(id).value.trim(); return v === "" ? null : Number(v); };
    const s = { temperature: num("temperature"), top_p: num("top-p"), top_k: num("top-k"), max_tokens: num("max-tokens"),
                seed: num("seed") };
    // one seed for both columns: a difference between them is the profiles', not the sampler's
    if (s.seed === null) s.seed = Math.floor(Math.random() * 2 ** 31);
    for (const k of Object.keys(s)) if (s[k] === null || Number.isNaN(s[k])) delete s[k];
    return s;
  }

  // The last prompt again under other profiles (the board's run), in the conversation it was
  // asked in: its answers are comparable with the first one and with each other, and the
  // conversation is not extended by them.
  replay(values) {
    if (!this.last) { this.ui.showMessage("no prompt yet: ask something in the chat first"); return null; }
    return this.send(this.last.text, values, this.last.context);
  }

  // Send the prompt box (or `prompt`) under the pickers' profiles; `values` overrides them.
  // context: the turns before the prompt for every column (a replay), else each column's own.
  async send(prompt = null, values = null, context = null) {
    const ui = this.ui;
    if (!ui.ready) { ui.showMessage("not connected to the server yet (is the API key right?)"); return; }
    const text = prompt ?? $("prompt").value.trim();
    if (!text) { ui.showMessage("type a prompt first"); return; }
    if (this.controller) { ui.showMessage("an answer is still streaming: stop it first"); return; }
    const sides = values ?? ($("compare").checked ? { a: $("profile-a").value, b: $("profile-b").value }
                                                  : { a: $("profile-a").value });
    $("col-b").hidden = !("b" in sides);
    const settings = this.settings();
    const system = $("system").value.trim();
    if (!context) this.last = { text, context: [...this.history.a] };
    $("prompt").value = "";
    this.controller = new AbortController();
    $("stop").disabled = false;
    $("send").disabled = true;
    try {
      const runs = [];
      for (const [side, value] of Object.entries(sides)) {
        let spec;
        try {
          spec = ui.profileSpec(value);
        } catch (e) { ui.report(e); continue; }
        const messages = [...(system ? [{ role: "system", content: system }] : []), ...(context || this.history[side]),
                          { role: "user", content: text }];
        runs.push(this.run(side, value, spec, messages, settings, !context));
      }
      await Promise.all(runs);
    } finally {
      this.controller = null;
      $("stop").disabled = true;
      $("send").disabled = false;
    }
  }

  async run(side, value, spec, messages, settings, extend) {
    const ui = this.ui;
    const a = { id: nextId++, side, value, label: ui.profileLabel(value), spec, messages, settings, text: "", chunks: 0,
                trace: null, error: null, done: false, profileName: null };
    this.answers.push(a);
    const col = $("col-" + side);
    const user = el("div", "turn user");
    user.append(el("div", "head", "you"), el("div", "text", messages[messages.length - 1].content));
    const box = el("div", "turn answer");
    box.dataset.answerId = a.id;
    box.dataset.side = side;
    const head = el("div", "head");
    const show = el("button", "", "routing");
    show.type = "button";
    show.disabled = true;
    show.onclick = () => { ui.routing.show(a); ui.showView("routing"); };
    head.append(el("span", "", `profile ${a.label}`), show);
    const body = el("div", "text");
    box.append(head, body);
    col.append(user, box);
    try {
      const req = { messages, stream: true, steer_trace: true, steer_profile: spec, ...settings };
      for await (const chunk of stream("/v1/chat/completions", req, this.controller.signal)) {
        const piece = chunk.choices?.[0]?.delta?.content;
        if (piece) { a.text += piece; a.chunks++; body.textContent = a.text; }
        if (chunk.steer_trace) a.trace = chunk.steer_trace;
        if (chunk.steer_profile) a.profileName = chunk.steer_profile;
      }
      a.done = true;
      box.dataset.done = "1";
      if (extend) {
        this.history[side].push({ role: "user", content: messages[messages.length - 1].content },
                                { role: "assistant", content: a.text });
      }
      show.disabled = !a.trace;
      ui.routing.listAnswers();
    } catch (e) {
      a.error = e.name === "AbortError" ? "stopped" : e.message;
      box.dataset.error = "1";
      box.append(el("div", "error", a.error));
      if (a.text) show.disabled = true;
      ui.report(e);
    }
    return a;
  }
}
