// The page: wiring between the views, the messages line, the profile pickers and the key.
// window.steerUI exposes the state (answers, board, routing, detection) for tests and scripts.
import { ApiError, getJSON, getKey, setKey } from "./api.js";
import { Board } from "./board.js";
import { Chat } from "./chat.js";
import { DetectionView } from "./detection.js";
import { RoutingView } from "./routing.js";

const BOARD = "__board__";
const $ = (id) => document.getElementById(id);

const ui = {
  model: null,
  profiles: [],     // usable profile names (without "none")
  excluded: {},     // name -> why the server excluded it
  ready: false,
  messages: [],     // every message shown, newest last: {text, kind}
  profileCache: new Map(),
};
window.steerUI = ui;

// ---- messages: every error the page meets ends up here, never only in the console --------------
function showMessage(text, kind = "error") {
  const msg = { text, kind };
  ui.messages.push(msg);
  const div = document.createElement("div");
  div.className = "msg " + kind;
  const span = document.createElement("span");
  span.textContent = text;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "×";
  close.title = "dismiss";
  msg.dismiss = () => { div.remove(); ui.messages.splice(ui.messages.indexOf(msg) >>> 0, 1); };
  close.onclick = msg.dismiss;
  div.append(span, close);
  $("messages").append(div);
  if (kind === "info") setTimeout(msg.dismiss, 6000);
}

// what was said before the page could connect (no key, a wrong key) no longer holds once it has
function clearMessages() {
  for (const m of [...ui.messages]) m.dismiss();
}

function report(e) {
  if (e?.name === "AbortError") return;
  showMessage(e instanceof ApiError ? e.message : `page error: ${e?.message || e}`);
}
window.addEventListener("error", (ev) => showMessage(`page error: ${ev.message}`));
window.addEventListener("unhandledrejection", (ev) => report(ev.reason));

// ---- profiles --------------------------------------------------------------------------------
// The rules of a profile an answer ran under: a name (asked from the server once) or the board's dict.
async function profileRules(spec) {
  if (spec !== null && typeof spec === "object") return spec;
  const name = spec ?? ui.model.default_profile;
  if (!ui.profileCache.has(name)) ui.profileCache.set(name, getJSON(`/v1/steer/profiles/${encodeURIComponent(name)}`).then((b) => b.profile));
  return ui.profileCache.get(name);
}

// A picker's value as a request's steer_profile: a name, or the board as a whole profile.
function profileSpec(value) {
  return value === BOARD ? ui.board.toProfile() : value;
}

function profileLabel(value) {
  return value === BOARD ? `board "${ui.board.name()}"` : value;
}

function fillPickers() {
  const names = ["none", ...ui.profiles];
  for (const id of ["profile-a", "profile-b", "board-server-profile"]) {
    const sel = $(id);
    const keep = sel.value;
    sel.textContent = "";
    for (const n of names) sel.add(new Option(n, n));
    for (const [n, why] of Object.entries(ui.excluded)) {
      const o = new Option(`${n} (excluded)`, n);
      o.title = why;
      sel.add(o);
    }
    if (id !== "board-server-profile") sel.add(new Option("(the expert board)", BOARD));
    if (keep) sel.value = keep;
  }
  if (!$("profile-a").dataset.touched) $("profile-a").value = ui.model.default_profile;
}

// ---- start -----------------------------------------------------------------------------------
async function connect() {
  try {
    ui.model = await getJSON("/v1/steer/model");
    const ps = await getJSON("/v1/steer/profiles");
    ui.profiles = ps.data.map((p) => p.name);
    ui.excluded = Object.fromEntries(ps.excluded.map((x) => [x.name, x.error]));
  } catch (e) {
    $("model-line").textContent = "not connected";
    report(e);
    return;
  }
  const m = ui.model;
  $("model-line").textContent = `${m.id}: ${m.architecture}, ${m.moe_layers.length} MoE layers x ${m.n_expert} experts, ` +
    `top-${m.n_expert_used}; default profile ${m.default_profile}`;
  ui.board.setModel(m);
  ui.routing.setModel(m);
  ui.detection.setModel(m);
  fillPickers();
  clearMessages();
  ui.ready = true;
  document.body.dataset.ready = "1";
}

function showView(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === name);
  for (const v of document.querySelectorAll(".view")) v.classList.toggle("active", v.id === "view-" + name);
  ui.view = name;
  if (name === "routing") ui.routing.resize();
  if (name === "board") ui.board.draw();
  if (name === "detection") ui.detection.draw();
}
ui.showView = showView;

Object.assign(ui, { showMessage, report, profileRules, profileSpec, profileLabel, BOARD });

function init() {
  ui.board = new Board(ui);
  ui.routing = new RoutingView(ui);
  ui.chat = new Chat(ui);
  ui.detection = new DetectionView(ui);
  for (const b of document.querySelectorAll("#tabs button")) b.onclick = () => showView(b.dataset.view);
  $("profile-a").onchange = () => { $("profile-a").dataset.touched = "1"; };
  $("compare").onchange = () => {
    $("profile-b").disabled = !$("compare").checked;
    $("col-b").hidden = !$("compare").checked;
  };
  const key = $("api-key");
  key.value = getKey();
  key.onchange = () => { setKey(key.value); ui.profileCache.clear(); if (!ui.ready) connect(); };
  ui.board.bindControls();
  connect();
}

init();
