// OpenMedNet page: upload one file to /api/predict and show probabilities + Grad-CAM overlays
// (a segmentation model: pixel fractions per class + the mask overlay).
// Plain DOM code, no framework or CDN, so the page works offline.
"use strict";

const drop = document.getElementById("drop");
const input = document.getElementById("file");
const statusEl = document.getElementById("status");
const errorEl = document.getElementById("error");
const results = document.getElementById("results");

function showError(message) {
  errorEl.textContent = message;
  errorEl.hidden = false;
}

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
  if (text) node.textContent = text;  // textContent: file names are never parsed as HTML
  return node;
}

function renderResult(filename, item) {
  const box = el("div", { class: "result", "data-frame": item.frame });
  if (item.overlay_png) {
    const alt = item.label ? "Grad-CAM of " + item.label : "predicted mask";
    box.appendChild(el("img", { src: "data:image/png;base64," + item.overlay_png, alt: alt }));
  }
  const info = el("div");
  const title = filename + (item.frame ? " (frame " + item.frame + ")" : "");
  info.appendChild(el("h2", {}, title));
  info.appendChild(el("p", { class: "label" }, item.label || "share of pixels per class"));
  const table = el("table");
  Object.entries(item.probabilities || item.fractions).sort((a, b) => b[1] - a[1]).forEach(([name, p]) => {
    const row = el("tr");
    row.appendChild(el("td", {}, name));
    row.appendChild(el("td", { class: "prob" }, p.toFixed(3)));
    const barCell = el("td");
    barCell.appendChild(el("div", { class: "bar", style: "width:" + Math.round(p * 200) + "px" }));
    row.appendChild(barCell);
    table.appendChild(row);
  });
  info.appendChild(table);
  item.notes.forEach((n) => info.appendChild(el("p", { class: "note" }, "Input converted: " + n)));
  box.appendChild(info);
  return box;
}

async function upload(file) {
  errorEl.hidden = true;
  results.replaceChildren();
  statusEl.textContent = "Predicting " + file.name + "\u2026";
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch("/api/predict", { method: "POST", body: form });
    const body = await response.json().catch(() => ({ detail: response.statusText }));
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      throw new Error("HTTP " + response.status + ": " + detail);
    }
    body.results.forEach((item) => results.appendChild(renderResult(body.filename, item)));
    statusEl.textContent = "Done: " + body.results.length + " image(s) from " + body.filename;
  } catch (err) {
    statusEl.textContent = "";
    showError(err.message);
  }
}

input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); });
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });

fetch("/api/model").then((r) => r.json()).then((card) => {
  const c = card.input_contract;
  document.getElementById("model").textContent =
    card.architecture + " \u2014 classes: " + card.label_names.join(", ") +
    " \u2014 input: " + c.channels + " channel(s), " + c.size.join("\u00d7") + " px";
}).catch(() => showError("could not load the model card"));
