// NaTra direction explorer page: no framework, no external resources (the machines are offline).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, session: null, label: null, inFlight: false, pending: false, edits: 0 };

function showError(msg) {
  const box = $("error");
  box.textContent = msg;
  box.hidden = !msg;
}

async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(path, options);
  } catch (e) {
    throw new Error("the explorer server did not answer (" + e.message + ")");
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) throw new Error((body && body.error) || ("HTTP " + resp.status));
  return body;
}

function postJson(path, payload) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
}

function setBusy(busy, text) {
  document.body.dataset.state = busy ? "busy" : "idle";
  $("status").textContent = text || "";
}

function fmtPct(p) { return (100 * p).toFixed(1) + "%"; }

// ------------------------------------------------------------------ setup
function fillLayers(info) {
  for (const id of ["layer-start", "layer-end"]) {
    const sel = $(id);
    sel.innerHTML = "";
    for (let i = 0; i < info.generator.num_ws; i++) {
      const opt = document.createElement("option");
      opt.value = String(i);
      opt.textContent = String(i);
      sel.appendChild(opt);
    }
    sel.addEventListener("change", scheduleEdit);
  }
  $("layer-start").value = String(info.layer_start);
  $("layer-end").value = String(info.layer_end);
  $("layers-note").textContent = "D(u, a-b) moves style inputs a..b of " + info.generator.num_ws +
    " (0 = coarse, " + (info.generator.num_ws - 1) + " = fine); the trial trained on " +
    info.layer_start + "-" + info.layer_end + ".";
}

function fillDirections(info) {
  const box = $("directions");
  box.innerHTML = "";
  for (const d of info.directions) {
    const row = document.createElement("div");
    row.className = "direction";
    const name = document.createElement("label");
    name.htmlFor = "strength-" + d.index;
    name.textContent = d.estimator + " #" + d.index;
    const ev = document.createElement("span");
    ev.className = "ev";
    ev.textContent = (d.explained_variance != null ? "var " + fmtPct(d.explained_variance) + ", " : "") +
      "std " + d.scale.toFixed(3);
    name.appendChild(ev);
    const slider = document.createElement("input");
    slider.type = "range";
    slider.className = "strength";
    slider.id = "strength-" + d.index;
    slider.dataset.index = String(d.index);
    slider.min = String(-info.max_strength);
    slider.max = String(info.max_strength);
    slider.step = "0.1";
    slider.value = "0";
    const out = document.createElement("output");
    out.id = "value-" + d.index;
    out.textContent = "0.0";
    slider.addEventListener("input", () => { out.textContent = Number(slider.value).toFixed(1); scheduleEdit(); });
    row.append(name, slider, out);
    box.appendChild(row);
  }
  $("reset").addEventListener("click", () => {
    for (const s of document.querySelectorAll("input.strength")) s.value = "0";
    for (const o of document.querySelectorAll(".direction output")) o.textContent = "0.0";
    scheduleEdit();
  });
}

async function loadGallery() {
  const g = await api("/api/gallery");
  $("gallery-note").textContent = g.items.length ? "from the " + g.note + " (click one)" : g.note;
  const box = $("gallery");
  box.innerHTML = "";
  for (const item of g.items) {
    const b = document.createElement("button");
    b.type = "button";
    b.title = "#" + item.index + ": " + item.name;
    b.dataset.index = String(item.index);
    b.setAttribute("role", "listitem");
    const img = document.createElement("img");
    img.src = item.png;
    img.alt = item.name;
    b.appendChild(img);
    b.addEventListener("click", () => pickDataset(item.index, b));
    box.appendChild(b);
  }
}

// ------------------------------------------------------------------ rendering
function renderBars(pred, truth) {
  const box = $("prediction-bars");
  box.innerHTML = "";
  const names = state.info.class_names;
  pred.probs.forEach((p, i) => {
    const row = document.createElement("div");
    row.className = "bar" + (i === pred.label ? " top" : "") + (i === truth ? " truth" : "");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = names[i] || ("class " + i);
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.appendChild(fill);
    const val = document.createElement("span");
    val.textContent = fmtPct(p);
    row.append(name, track, val);
    box.appendChild(row);
  });
}

function renderPrediction(pred, flipped, escaped) {
  const label = $("prediction-label");
  label.textContent = "classifier on the edited image: " + pred.name + " (" + fmtPct(pred.prob) + ")";
  label.className = flipped || escaped ? "flipped" : "";
  if (escaped) {
    const b = document.createElement("span");
    b.className = "badge";
    b.textContent = "escaped: true class is " + state.info.class_names[state.label];
    label.appendChild(b);
  } else if (flipped) {
    const b = document.createElement("span");
    b.className = "badge";
    b.textContent = "flipped";
    label.appendChild(b);
  }
  $("edited-caption").textContent = pred.name + " " + fmtPct(pred.prob);
  renderBars(pred, state.label);
}

function showSource(r) {
  state.session = r.session;
  state.label = r.label;
  $("source-img").src = r.source;
  $("recon-img").src = r.recon;
  $("source-caption").textContent = (r.label_name ? "true: " + r.label_name + ", " : "uploaded, ") +
    "pred " + r.pred_source.name;
  $("recon-caption").textContent = "pred " + r.pred_recon.name + " " + fmtPct(r.pred_recon.prob);
  scheduleEdit();
}

// ------------------------------------------------------------------ actions
async function pickDataset(index, button) {
  for (const b of document.querySelectorAll("#gallery button")) b.classList.remove("selected");
  if (button) button.classList.add("selected");
  setBusy(true, "inverting dataset image #" + index + " (encoder + LCE)...");
  try {
    showSource(await postJson("/api/source", { dataset_index: index }));
    showError("");
  } catch (e) {
    showError(e.message);
    setBusy(false, "");
  }
}

async function upload(file) {
  if (!file) return;
  const limit = state.info.max_upload_bytes;
  if (file.size > limit) {  // the server refuses it too (413); this spares sending it
    showError("upload failed: " + file.name + " is " + file.size + " bytes; the limit is " + limit +
      " bytes (" + (limit / 1048576).toFixed(1) + " MiB): send a smaller file");
    return;
  }
  for (const b of document.querySelectorAll("#gallery button")) b.classList.remove("selected");
  setBusy(true, "inverting " + file.name + " (encoder + LCE)...");
  try {
    const invert = $("invert").checked ? "1" : "0";
    showSource(await api("/api/upload?invert=" + invert, { method: "POST", body: file }));
    showError("");
  } catch (e) {
    showError("upload failed: " + e.message);
    setBusy(false, "");
  }
}

function currentEdit() {
  const strengths = {};
  for (const s of document.querySelectorAll("input.strength")) strengths[s.dataset.index] = Number(s.value);
  return { session: state.session, strengths: strengths,
           start: Number($("layer-start").value), end: Number($("layer-end").value) };
}

// At most one edit request in flight; slider moves meanwhile collapse into one follow-up.
function scheduleEdit() {
  if (!state.session) return;
  if (state.inFlight) { state.pending = true; return; }
  runEdit();
}

async function runEdit() {
  state.inFlight = true;
  state.pending = false;
  setBusy(true, "rendering...");
  try {
    const r = await postJson("/api/edit", currentEdit());
    $("edited-img").src = r.image;
    renderPrediction(r.prediction, r.flipped, r.escaped);
    state.edits += 1;
    document.body.dataset.edits = String(state.edits);
    showError("");
  } catch (e) {
    showError(e.message);
  } finally {
    state.inFlight = false;
    if (state.pending) runEdit(); else setBusy(false, "");
  }
}

async function main() {
  setBusy(true, "loading...");
  try {
    const info = await api("/api/info");
    state.info = info;
    $("pipeline").textContent = info.source + " - " + info.directions.length + " " + info.estimator +
      " directions, generator " + info.generator.resolution + "px with " + info.generator.num_ws +
      " style inputs, classifier " + info.classifier.name + " (" + info.classifier.method + "), LCE " +
      info.lce.codes + " code(s)";
    fillLayers(info);
    fillDirections(info);
    $("upload").addEventListener("change", (ev) => upload(ev.target.files[0]));
    await loadGallery();
    document.body.dataset.ready = "1";
    setBusy(false, "");
  } catch (e) {
    showError(e.message);
    setBusy(false, "");
  }
}

main();
