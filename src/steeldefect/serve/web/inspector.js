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
  document.body.dataset.busy = "0";
  loadModel();
}

setup();
