// posttrain ui: fills each page's frame from the JSON endpoints. Text from runs and models goes in as text
// (textContent), never as markup; only the figures and tables the server renders (posttrain.report) are HTML.
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const res = await fetch(path, opts);
  const type = res.headers.get("Content-Type") || "";
  const data = type.startsWith("application/json") ? await res.json() : await res.text();
  if (!res.ok) {
    const msg = (data && data.error && data.error.message) || `${res.status} ${res.statusText}`;
    throw new Error(msg);
  }
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function showError(id, err) {
  const box = $(id);
  box.hidden = !err;
  box.textContent = err ? (err.message || String(err)) : "";
}

function num(v) {
  if (typeof v !== "number") return v ?? "\u2014";
  return Number.isInteger(v) ? String(v) : v.toPrecision(4).replace(/\.?0+(e|$)/, "$1");
}

function ago(t) {
  if (!t) return "\u2014";
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 90 ? `${Math.round(s)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

const runLink = (name) => el("a", {href: "/run?name=" + encodeURIComponent(name)}, name);
const badge = (status) => el("span", {class: "status " + status}, status);
const runApi = (name, what) => "/api/runs/" + name.split("/").map(encodeURIComponent).join("/") + "/" + what;

// ---- runs browser ----
async function runsPage() {
  try {
    const data = await api("/api/runs");
    $("runs-dir").textContent = data.runs_dir;
    const body = $("runs-table").tBodies[0];
    body.replaceChildren(...data.runs.map((r) => el("tr", {"data-run": r.name},
      el("td", {}, runLink(r.name)), el("td", {}, r.method), el("td", {}, badge(r.status)),
      el("td", {class: "num"}, num(r.last_step)),
      el("td", {class: "num"}, r.key_metric ? `${r.key_metric} ${num(r.key_value)}` : "\u2014"),
      el("td", {}, ago(r.updated)))));
    $("runs-note").textContent = data.runs.length ? "" : "no run folders here yet (start one under Start a run)";
  } catch (err) {
    $("runs-note").textContent = err.message;
  }
  setTimeout(runsPage, POLL_MS);
}

// ---- one run: live curves ----
async function runPage() {
  const name = new URLSearchParams(location.search).get("name") || "";
  $("run-title").textContent = name;
  document.title = `${name} \u00b7 posttrain ui`;
  let since = -1, drawn = false, detailsFor = null;
  async function tick() {
    let data;
    try {
      data = await api(runApi(name, "metrics") + "?since=" + since);
      showError("run-error", null);
    } catch (err) {
      showError("run-error", err);
      setTimeout(tick, POLL_MS);
      return;
    }
    $("run-status").replaceChildren(badge(data.status));
    $("run-step").textContent = data.last_step == null ? "" : ` step ${data.last_step} \u00b7 ${data.method}`;
    if (data.records.length || !drawn) {
      since = data.last_step ?? since;
      $("curves").innerHTML = await api(runApi(name, "curves"));  // the report's own SVG figures
      drawn = true;
    }
    if (detailsFor !== data.status) {  // the evals and config once at load, and again when the status changes
      detailsFor = data.status;
      const info = await api(runApi(name, "summary"));
      $("evals").innerHTML = info.evals_html;
      $("config").textContent = info.config || "(no config.yaml)";
    }
    if (data.status === "running") setTimeout(tick, POLL_MS);
  }
  tick();
}

// ---- compare ----
async function comparePage() {
  const wanted = new URLSearchParams(location.search).getAll("run");
  const data = await api("/api/runs");
  $("compare-picks").replaceChildren(...data.runs.map((r) => el("label", {},
    Object.assign(el("input", {type: "checkbox", value: r.name}), {checked: wanted.includes(r.name)}), " ", r.name)));
  async function compare(names) {
    try {
      if (names.length < 2 || names.length > 4) throw new Error(`pick 2 to 4 runs (${names.length} picked)`);
      const query = names.map((n) => "run=" + encodeURIComponent(n)).join("&");
      $("compare-out").innerHTML = await api("/api/compare?" + query);
      history.replaceState(null, "", "/compare?" + query);
      showError("compare-error", null);
    } catch (err) {
      showError("compare-error", err);
    }
  }
  $("compare-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    compare([...document.querySelectorAll("#compare-picks input:checked")].map((i) => i.value));
  });
  if (wanted.length) compare(wanted);
}

// ---- chat playground ----
async function chatPage() {
  let history = [];
  const models = (await api("/api/models")).models;
  $("chat-model").replaceChildren(...models.map((m) => el("option", {value: m}, m)));
  const wanted = new URLSearchParams(location.search).get("model");
  if (wanted && models.includes(wanted)) $("chat-model").value = wanted;
  $("chat-reset").addEventListener("click", () => { history = []; $("chat-log").replaceChildren(); });
  $("chat-model").addEventListener("change", () => { history = []; $("chat-log").replaceChildren(); });
  $("chat-send").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text) return;
    const messages = [...history, {role: "user", content: text}];
    $("chat-log").append(el("div", {class: "msg user"}, text));
    $("chat-input").value = "";
    $("chat-submit").disabled = true;
    const pending = el("div", {class: "msg assistant pending"}, "\u2026");
    $("chat-log").append(pending);
    try {
      const r = await api("/api/chat", {model: $("chat-model").value, messages,
        temperature: Number($("chat-temperature").value), max_tokens: Number($("chat-max-tokens").value)});
      pending.replaceChildren(r.text, el("span", {class: "meta"},
        `${r.model} \u00b7 ${r.completion_tokens} tokens \u00b7 ${r.finish_reason} \u00b7 ${r.seconds} s`));
      pending.className = "msg assistant answer";
      history = [...messages, {role: "assistant", content: r.text}];
      showError("chat-error", null);
    } catch (err) {
      pending.remove();
      showError("chat-error", err);
    }
    $("chat-submit").disabled = false;
  });
}

// ---- start a run ----
function launchBox(l) {
  const stop = el("button", {type: "button"}, "Stop");
  stop.disabled = l.status !== "running";
  stop.addEventListener("click", async () => {
    stop.disabled = true;
    try { await api("/api/launches/" + encodeURIComponent(l.name) + "/stop", {}); } catch (err) { alert(err.message); }
  });
  const box = el("div", {class: "launch", "data-launch": l.name},
    el("div", {class: "head"}, runLink(l.name), badge(l.status), stop,
       el("span", {class: "note"}, "python -m posttrain " + l.argv.slice(2).join(" "))));
  if (l.error) box.append(el("div", {class: "error"}, l.error));
  box.append(el("pre", {}, l.tail.join("\n")));
  return box;
}

async function launchPage() {
  const opts = await api("/api/launch/options");
  $("launch-example").append(...Object.entries(opts.examples).map(([f, m]) => el("option", {value: f}, `${f} (${m})`)));
  $("launch-config").append(...opts.configs.map((f) => el("option", {value: f}, f)));
  async function refresh() {
    try {
      const data = await api("/api/launches");
      if (data.launches.length) $("launches").replaceChildren(...data.launches.map(launchBox));
    } catch (err) { /* the next poll tries again */ }
    setTimeout(refresh, POLL_MS);
  }
  $("launch-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("launch-submit").disabled = true;
    try {
      await api("/api/launch", {name: $("launch-name").value.trim(), example: $("launch-example").value,
        config: $("launch-config").value, overrides: $("launch-overrides").value.split("\n")});
      showError("launch-error", null);
    } catch (err) {
      showError("launch-error", err);
    }
    $("launch-submit").disabled = false;
  });
  refresh();
}

// ---- login (only when the UI has an API key) ----
function loginPage() {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("/api/login", {key: $("login-key").value});
      location.href = "/";
    } catch (err) {
      showError("login-error", err);
    }
  });
}

const PAGES = {runs: runsPage, run: runPage, compare: comparePage, chat: chatPage, launch: launchPage, login: loginPage};
PAGES[document.body.dataset.page]();
