// chestxray web page: upload one X-ray, show the prediction, class probabilities and Grad-CAM.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = "";
let maxUploadBytes = 20 * 1024 * 1024;
let oodThreshold = null;

function headers() {
  return apiKey ? { "X-API-Key": apiKey } : {};
}

function percent(p) {
  return p > 0 && p < 0.0005 ? "< 0.1 %" : (100 * p).toFixed(1) + " %";
}

function megabytes(n) {
  return (n / (1024 * 1024)).toFixed(n % (1024 * 1024) ? 1 : 0) + " MB";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return "The server answered " + response.status + " " + response.statusText + ".";
}

async function loadModel() {
  const response = await fetch("/v1/model", { headers: headers() });
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("model-line").textContent = "Enter the API key to use this server.";
    return;
  }
  if (!response.ok) {
    $("model-line").textContent = "Model information unavailable: " + await errorMessage(response);
    return;
  }
  const model = await response.json();
  $("key-form").hidden = true;
  maxUploadBytes = model.max_upload_bytes;
  oodThreshold = model.ood_threshold;
  $("limit").textContent = megabytes(maxUploadBytes);
  $("model-line").textContent = model.arch + " · " + model.image_size + " px · " +
    model.classes.length + " classes (" + model.classes.join(", ") + ")";
  const details = ["model " + model.model_id, model.backend + " backend"];
  if (model.trained_on && model.trained_on.n_train) {
    details.push("trained on " + model.trained_on.n_train + " images");
  }
  if (model.adaptation) details.push(model.adaptation);
  if (!model.ood_guard) details.push("no out-of-distribution guard in this bundle");
  $("model-details").textContent = details.join(" · ");
}

function renderBars(probabilities, top) {
  const list = $("bars");
  list.replaceChildren();
  const entries = Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
  for (const [name, p] of entries) {
    const item = document.createElement("li");
    if (top.includes(name)) item.classList.add("top");
    const label = document.createElement("span");
    label.className = "bar-name";
    label.textContent = name;
    label.title = name;
    const track = document.createElement("span");
    track.className = "bar-track";
    track.setAttribute("role", "meter");
    track.setAttribute("aria-label", name);
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuemax", "1");
    track.setAttribute("aria-valuenow", String(p));
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(1) + "%";
    fill.style.display = "block";
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = percent(p);
    item.append(label, track, value);
    list.appendChild(item);
  }
}

function mostProbable(probabilities) {
  return Object.entries(probabilities).reduce((best, entry) => (entry[1] > best[1] ? entry : best))[0];
}

function fillList(id, items) {
  const list = $(id);
  list.replaceChildren();
  for (const text of items || []) {
    const item = document.createElement("li");
    item.textContent = text;
    list.appendChild(item);
  }
}

function renderTrust(result) {
  $("refer").hidden = !result.refer;
  fillList("reasons", result.reasons);
  fillList("cautions", result.cautions);
  const set = result.prediction_set;
  $("prediction-set").textContent = set === null || set === undefined
    ? "Prediction set: not checked (this model has no conformal sets)."
    : "Prediction set at " + Math.round(100 * result.coverage) + "% coverage: " +
      (set.length ? set.join(", ") : "empty (no class fits)") + ".";
  const rows = $("header-rows");
  rows.replaceChildren();
  const header = result.header;
  $("header-fields").hidden = !header;
  $("header-none").textContent = header ? "" : "DICOM header: not checked (not a DICOM file).";
  for (const [name, value] of Object.entries(header || {})) {
    const row = document.createElement("tr");
    const key = document.createElement("th");
    key.textContent = name;
    const cell = document.createElement("td");
    cell.textContent = value;
    row.append(key, cell);
    rows.appendChild(row);
  }
}

function renderResult(result, fileName) {
  const top = result.label.split("|").filter((name) => name in result.probabilities);
  $("label").textContent = result.label.split("|").join(", ");
  $("confidence").textContent = top.length === 1 && result.probabilities[top[0]] !== undefined
    ? "probability " + percent(result.probabilities[top[0]]) : "";
  renderBars(result.probabilities, top);
  renderTrust(result);
  $("ood").hidden = !result.ood;
  $("result").classList.toggle("unreliable", Boolean(result.ood || result.refer));
  $("ood-score").textContent = result.ood_score === null || result.ood_score === undefined
    ? "not checked" : result.ood_score.toFixed(2) + (oodThreshold === null ? "" : " (flagged above " + oodThreshold.toFixed(2) + ")");
  $("ood-percentile").textContent = result.typicality
    ? "Typicality: " + result.typicality + "." : "Out-of-distribution check: not checked (no guard in this bundle).";
  $("meta").textContent = fileName + " · answered in " + Math.round(result.latency_ms) + " ms";
  const heatmap = $("heatmap");
  if (result.cam_png) {
    heatmap.src = "data:image/png;base64," + result.cam_png;
    heatmap.hidden = false;
    $("heatmap-caption").textContent = "Grad-CAM: the regions that most raised the score of " +
      mostProbable(result.probabilities) + " (red = most). It shows where the model looked, not where disease is.";
  } else {
    heatmap.hidden = true;
    heatmap.removeAttribute("src");
    $("heatmap-caption").textContent = "";
  }
  $("result").hidden = false;
  $("status").textContent = "";
}

async function analyse(file) {
  $("error").hidden = true;
  if (!file) return;
  if (file.size > maxUploadBytes) {
    showError(file.name + " is " + megabytes(file.size) + ": the limit is " + megabytes(maxUploadBytes) + ".");
    return;
  }
  $("status").textContent = "Analysing " + file.name + "…";
  const form = new FormData();
  form.append("file", file, file.name);
  let response;
  try {
    response = await fetch("/v1/predict?cam=true", { method: "POST", body: form, headers: headers() });
  } catch (err) {
    showError("Could not reach the server (" + err.message + ").");
    return;
  }
  if (response.status === 401) {
    $("key-form").hidden = false;
    showError("This server needs a valid API key.");
    return;
  }
  if (!response.ok) {
    showError(file.name + ": " + await errorMessage(response));
    return;
  }
  renderResult(await response.json(), file.name);
}

function setUp() {
  const drop = $("drop");
  const input = $("file");
  input.addEventListener("change", () => analyse(input.files[0]).finally(() => { input.value = ""; }));
  drop.addEventListener("click", (event) => { if (event.target.tagName !== "LABEL") input.click(); });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    analyse(event.dataTransfer.files[0]);
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = $("api-key").value.trim();
    loadModel();
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setUp);
