// The inspector's page: sends each picked/dropped image to POST /v1/predict and shows the answer.
// Plain script, no build step, no CDN (the line PC is offline). All text goes in with textContent.
"use strict";

const PARALLEL = 3;  // requests in flight from this page; the server bounds its own queue too
const state = { classes: [], tally: new Map(), total: 0, uncertain: 0, queue: [], running: 0, seq: 0 };
const $ = (id) => document.getElementById(id);

function headers() {
  const token = sessionStorage.getItem("steeldefect-token");
  return token ? { Authorization: "Bearer " + token } : {};
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function loadModel() {
  let response;
  try {
    response = await fetch("v1/model", { headers: headers() });
  } catch (error) {
    $("model").textContent = "service unreachable: " + error;
    return;
  }
  if (response.status === 401) {
    $("token-field").hidden = false;
    $("model").textContent = "this service needs a token: enter it on the right";
    return;
  }
  const model = await response.json();
  if (!response.ok) {
    $("model").textContent = "model: " + (model.error || response.status);
    return;
  }
  state.classes = model.class_names;
  $("tab-review").hidden = !model.review;
  for (const name of state.classes) if (!state.tally.has(name)) state.tally.set(name, 0);
  $("model").textContent = `${model.name} · ${model.variant} · sha256 ${model.sha256.slice(0, 12)}… · ` +
    `${model.class_names.length} classes · ${model.input_size.width}×${model.input_size.height}`;
  renderTally();
}

function renderTally() {
  const box = $("tally");
  box.replaceChildren();
  const most = Math.max(1, ...state.tally.values());
  for (const [name, n] of state.tally) {
    const row = el("div", "tally-row");
    row.dataset.class = name;
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = (100 * n / most) + "%";
    bar.append(fill);
    row.append(el("span", "", name), bar, el("span", "n", String(n)));
    box.append(row);
  }
  // Uncertain answers still count under their most likely class; how many there were is said apart.
  $("count").textContent = (state.total === 1 ? "1 image" : `${state.total} images`) +
    (state.uncertain ? ` · ${state.uncertain} uncertain` : "");
}

function addCard(file) {
  const card = el("article", "card pending");
  card.dataset.file = file.name;
  card.dataset.index = String(state.seq++);
  const url = URL.createObjectURL(file);
  const thumb = el("img", "thumb");
  thumb.alt = file.name;
  thumb.onerror = () => {  // e.g. TIFF: the server reads it, most browsers cannot show it
    const none = el("div", "thumb", "no preview");
    thumb.replaceWith(none);
    URL.revokeObjectURL(url);
  };
  thumb.onload = () => URL.revokeObjectURL(url);
  thumb.src = url;
  const body = el("div", "body");
  body.append(el("div", "name", file.name), el("div", "class muted", "waiting…"));
  const head = el("div", "card-head");
  head.append(thumb, body);
  card.append(head, el("div", "bars"));
  $("results").prepend(card);
  return card;
}

function showAnswer(card, answer) {
  const body = card.querySelector(".body");
  const title = body.querySelector(".class");
  title.className = "class";
  title.textContent = answer.class;
  card.dataset.class = answer.class;
  card.dataset.probability = String(answer.probability);
  if (answer.uncertain) {
    card.classList.add("uncertain");
    title.append(el("span", "badge", "uncertain"));
  }
  answer.top_k.forEach((entry, rank) => {
    const row = el("div", rank === 0 ? "bar-row top" : "bar-row");
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = (100 * entry.probability).toFixed(1) + "%";
    bar.append(fill);
    row.append(el("span", "", entry.class), bar, el("span", "p", (100 * entry.probability).toFixed(1) + "%"));
    card.querySelector(".bars").append(row);
  });
  const meta = [`${answer.server_ms.toFixed(1)} ms`];
  if (answer.confidence !== null && answer.confidence !== undefined) {
    meta.unshift(`calibrated confidence ${(100 * answer.confidence).toFixed(1)}%`);
  }
  if (answer.audit_id) meta.push(`audit #${answer.audit_id}`);
  const line = el("div", "meta");
  meta.forEach((part, i) => line.append(...(i ? [" · "] : []), el("span", "", part)));  // parts never split
  body.append(line);
  state.tally.set(answer.class, (state.tally.get(answer.class) || 0) + 1);
  state.total += 1;
  if (answer.uncertain) state.uncertain += 1;
  renderTally();
}

function showError(card, message) {
  card.classList.add("failed");
  card.dataset.error = message;
  const title = card.querySelector(".class");
  title.className = "class error";
  title.textContent = message;
}

async function classify(file, card) {
  const form = new FormData();
  form.append("file", file, file.name);
  const client = $("client").value.trim();
  if (client) form.append("client_id", client);
  const k = Math.max(1, state.classes.length || 3);
  try {
    const response = await fetch(`v1/predict?top_k=${k}`, { method: "POST", body: form, headers: headers() });
    const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) {
      if (response.status === 401) $("token-field").hidden = false;
      showError(card, answer.error || `HTTP ${response.status}`);
    } else {
      showAnswer(card, answer);
    }
  } catch (error) {
    showError(card, "request failed: " + error);
  } finally {
    card.classList.remove("pending");
  }
}

function pump() {
  while (state.running < PARALLEL && state.queue.length) {
    const [file, card] = state.queue.shift();
    state.running += 1;
    classify(file, card).finally(() => {
      state.running -= 1;
      updateStatus();
      pump();
    });
  }
  updateStatus();
}

function updateStatus() {
  const waiting = state.queue.length + state.running;
  $("status").textContent = waiting ? `classifying… ${waiting} to go` : "";
  document.body.dataset.busy = waiting ? "1" : "0";
}

function submit(files) {
  for (const file of files) state.queue.push([file, addCard(file)]);
  pump();
}

function setup() {
  const drop = $("drop");
  $("files").addEventListener("change", (event) => {
    submit(Array.from(event.target.files));
    event.target.value = "";  // picking the same files again classifies them again
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => submit(Array.from(event.dataTransfer.files)));
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("files").click(); });
  $("token").addEventListener("change", (event) => {
    sessionStorage.setItem("steeldefect-token", event.target.value);
    loadModel();
  });
  $("clear").addEventListener("click", () => {
    $("results").replaceChildren();
    for (const name of state.tally.keys()) state.tally.set(name, 0);
    state.total = 0;
    state.uncertain = 0;
    renderTally();
  });
  $("tab-classify").addEventListener("click", () => showTab("classify"));
  $("tab-review").addEventListener("click", () => showTab("review"));
  $("review-refresh").addEventListener("click", loadQueue);
  $("reviewer-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("reviewer").value.trim();
    if (!name) return;
    localStorage.setItem("steeldefect-reviewer", name);
    showReviewer();
    loadQueue();
  });
  $("reviewer-change").addEventListener("click", () => {
    localStorage.removeItem("steeldefect-reviewer");
    showReviewer();
  });
  document.body.dataset.busy = "0";
  loadModel();
  pollDrift();
  setInterval(pollDrift, 5000);
}

// ---- review tab: the queue of kept images, one decision per card -------------------------------------

function showTab(name) {
  $("classify-view").hidden = name !== "classify";
  $("review-view").hidden = name !== "review";
  $("tab-classify").classList.toggle("active", name === "classify");
  $("tab-review").classList.toggle("active", name === "review");
  if (name === "review") {
    showReviewer();
    if (reviewer()) loadQueue();
  }
}

function reviewer() {
  return localStorage.getItem("steeldefect-reviewer") || "";
}

function showReviewer() {  // the page asks for the name once; it stays in localStorage
  const name = reviewer();
  $("reviewer-form").hidden = Boolean(name);
  $("reviewer-shown").hidden = !name;
  $("reviewer-name").textContent = name;
}

async function loadQueue() {
  $("review-status").textContent = "loading queue…";
  let response, body;
  try {
    response = await fetch("v1/review/queue?limit=200", { headers: headers() });
    body = await response.json();
  } catch (error) {
    $("review-status").textContent = "queue unavailable: " + error;
    return;
  }
  if (!response.ok) {
    $("review-status").textContent = body.error || `HTTP ${response.status}`;
    return;
  }
  const box = $("queue");
  box.replaceChildren();
  for (const entry of body.entries) box.append(reviewCard(entry, body.class_names));
  $("review-count").textContent = body.entries.length ? `(${body.entries.length})` : "";
  $("review-status").textContent = body.entries.length ? `${body.entries.length} to review` : "nothing to review";
  document.body.dataset.queue = String(body.entries.length);
}

function reviewCard(entry, classNames) {
  const card = el("article", "card review-card");
  card.dataset.sha256 = entry.sha256;
  const thumb = el("img", "thumb");
  thumb.alt = "strip " + entry.sha256.slice(0, 12);
  // The image needs the token, which an <img src> cannot send: fetch it and show the blob.
  fetch(`v1/review/image/${entry.sha256}`, { headers: headers() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`HTTP ${r.status}`))))
    .then((blob) => { thumb.src = URL.createObjectURL(blob); })
    .catch(() => thumb.replaceWith(el("div", "thumb", "image gone")));
  const body = el("div", "body");
  const answer = entry.answer;
  const title = el("div", "class", answer ? answer.class : "answer not in the audit log");
  if (answer && answer.uncertain) title.append(el("span", "badge", "uncertain"));
  body.append(el("div", "name", `${entry.reason} · ${entry.sha256.slice(0, 12)}…`), title);
  const bars = el("div", "bars");
  for (const [rank, t] of (answer ? answer.top_k : []).entries()) {
    const row = el("div", rank === 0 ? "bar-row top" : "bar-row");
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = (100 * t.probability).toFixed(1) + "%";
    bar.append(fill);
    row.append(el("span", "", t.class), bar, el("span", "p", (100 * t.probability).toFixed(1) + "%"));
    bars.append(row);
  }
  const meta = el("div", "meta");
  const parts = [entry.first_seen.replace("T", " ").slice(0, 19) + " UTC", "client " + (entry.client_id || "—")];
  if (entry.audit_id) parts.push(`audit #${entry.audit_id}`);
  parts.push("no heatmap: the served .tflite has no gradients");
  parts.forEach((part, i) => meta.append(...(i ? [" · "] : []), el("span", "", part)));
  body.append(meta);
  const head = el("div", "card-head");
  head.append(thumb, body);

  const actions = el("div", "actions");
  const confirm = el("button", "confirm", answer ? `Confirm ${answer.class}` : "Confirm");
  confirm.type = "button";
  confirm.disabled = !answer;
  const other = el("select", "other");
  for (const name of classNames) {
    if (answer && name === answer.class) continue;
    const option = el("option", "", name);
    option.value = name;
    other.append(option);
  }
  const pick = el("button", "pick", "Set class");
  pick.type = "button";
  const kind = el("input", "kind");
  kind.placeholder = "new kind (e.g. oil_stain)";
  kind.maxLength = 64;
  const name = el("button", "name-kind", "New kind");
  name.type = "button";
  const note = el("input", "note");
  note.placeholder = "note (optional)";
  note.maxLength = 1000;
  actions.append(confirm, other, pick, kind, name, note);
  const outcome = el("div", "outcome");
  card.append(head, bars, actions, outcome);

  const key = (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`);  // one per card
  const send = (decided, newKind) => decide(card, entry.sha256, {
    reviewer: reviewer(), decided_class: decided, new_kind: newKind,
    note: note.value.trim() || null, idempotency_key: key,
  }, outcome);
  confirm.addEventListener("click", () => answer && send(answer.class, false));
  pick.addEventListener("click", () => other.value && send(other.value, false));
  name.addEventListener("click", () => kind.value.trim() && send(kind.value.trim(), true));
  return card;
}

async function decide(card, sha256, decision, outcome) {
  if (!decision.reviewer) {
    showReviewer();
    outcome.className = "outcome error";
    outcome.textContent = "enter your name above first";
    return;
  }
  let response, body;
  try {
    response = await fetch(`v1/review/${sha256}`, {
      method: "POST", body: JSON.stringify(decision),
      headers: { ...headers(), "Content-Type": "application/json" },
    });
    body = await response.json();
  } catch (error) {
    outcome.className = "outcome error";
    outcome.textContent = "not saved: " + error;  // the same key on retry: still one decision
    return;
  }
  if (!response.ok) {
    outcome.className = "outcome error";
    outcome.textContent = body.error || `HTTP ${response.status}`;
    return;
  }
  card.classList.add("decided");
  card.dataset.decided = body.decided_class;
  outcome.className = "outcome";
  outcome.textContent = `${body.new_kind ? "new kind" : "class"} ${body.decided_class} · by ${body.reviewer}`;
  for (const control of card.querySelectorAll(".actions button")) control.disabled = true;
  const left = $("queue").querySelectorAll(".review-card:not(.decided)").length;
  $("review-count").textContent = left ? `(${left})` : "";
  $("review-status").textContent = left ? `${left} to review` : "all reviewed";
}

async function pollDrift() {
  try {
    const response = await fetch("v1/drift", { headers: headers() });
    if (!response.ok) return;
    const drift = await response.json();
    const banner = $("drift");
    banner.hidden = !drift.alarm;
    if (drift.alarm) {
      const u = drift.uncertain || {};
      banner.textContent = `Drift alarm: the last ${drift.images} images do not look like the training data` +
        (u.share !== null && u.share !== undefined ? ` (uncertain ${(100 * u.share).toFixed(1)}% vs ` +
          `${(100 * (u.expected || 0)).toFixed(1)}% expected)` : "") + ". Review the queue; retrain if it persists.";
    }
  } catch (error) {
    // the service is unreachable: loadModel says so already
  }
}

setup();
