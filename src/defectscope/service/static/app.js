// defectscope page: plain JavaScript over the /v1 API; every asset is served by the app itself.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { model: null, labelled: null, threshold: null, review: new Set() };

function headers() {
  const token = sessionStorage.getItem("token") || "";
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (_) { /* not JSON */ }
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return response;
}

const esc = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function say(text) { $("status").textContent = text || ""; }

async function blobUrl(path) { return URL.createObjectURL(await (await api(path)).blob()); }

function tab(name) {
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((s) => s.classList.toggle("active", s.id === name));
  if (name === "threshold") loadThreshold();
  if (name === "card") loadCard();
  if (name === "review") loadReview();
  if (name === "history") loadHistory();
}

async function loadModels() {
  try {
    const { models } = await (await api("/v1/models")).json();
    $("model").innerHTML = models.map((m) => `<option value="${esc(m.name)}">${esc(m.name)} (${esc(m.detector)})</option>`).join("");
    state.model = models.length ? models[0].name : null;
    say(models.length ? "" : "no models are served");
    const { role } = await (await api("/v1/whoami")).json();
    document.querySelectorAll(".engineer").forEach((element) => { element.hidden = role !== "engineer"; });
  } catch (error) { say(error.message); }
}

// -- Inspect ----------------------------------------------------------------------------
async function inspect(files) {
  if (!files.length || !state.model) return;
  const form = new FormData();
  for (const file of files) form.append("files", file);
  say("scoring " + files.length + " image(s)...");
  try {
    const body = await (await api(`/v1/models/${state.model}/inspect?heatmap=true&regions=true`, { method: "POST", body: form })).json();
    const urls = [...files].map((f) => URL.createObjectURL(f));  // by upload position: two files may share a name
    const results = body.results.map((r) => ({ ...r, url: urls[r.index] }));
    results.sort((a, b) => (b.score ?? Infinity) - (a.score ?? Infinity));
    $("gallery").innerHTML = "";
    results.forEach((r, i) => {
      const tile = document.createElement("div");
      tile.className = "tile";
      tile.dataset.index = i;
      const kind = r.verdict.split(" ")[0];
      tile.innerHTML = `<img src="${r.url}" alt="${esc(r.name)}"><span class="badge ${esc(kind)}">${esc(r.verdict)}</span>
        <div>${esc(r.name)}</div><div>score ${r.score === null ? "-" : r.score.toFixed(3)}</div>`;
      tile.onclick = () => showDetail(r);
      $("gallery").appendChild(tile);
    });
    say("");
    if (results.length) showDetail(results[0]);
  } catch (error) { say(error.message); }
}

function showDetail(result) {
  $("detail").hidden = false;
  $("detail-image").src = result.url;
  $("detail-heat").src = result.heatmap_png ? "data:image/png;base64," + result.heatmap_png : "";
  $("detail-heat").hidden = !result.heatmap_png;
  const svg = $("detail-regions");
  svg.setAttribute("viewBox", `0 0 ${result.width || 1} ${result.height || 1}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.innerHTML = (result.regions || []).flatMap((region) => region.polygons.map((flat) => {
    const points = [];
    for (let i = 0; i < flat.length; i += 2) points.push(flat[i] + "," + flat[i + 1]);
    return `<polygon points="${points.join(" ")}"></polygon>`;
  })).join("");
  $("detail-text").textContent = `${result.name}: ${result.verdict}` +
    (result.score === null ? ` (${result.error})` : `, score ${result.score.toFixed(4)}, normalized ${result.normalized?.toFixed(3)}, ` +
     `${(result.regions || []).length} region(s)`);
}

// -- Threshold --------------------------------------------------------------------------
async function loadLabelled() {
  const body = await (await api(`/v1/models/${state.model}/labelled`)).json();
  state.labelled = body.images;
  state.threshold = body.threshold;
  return body;
}

function counts(threshold) {
  let tp = 0, fp = 0, tn = 0, fn = 0;
  for (const image of state.labelled) {
    const flagged = image.score >= threshold;
    if (image.label === 1) flagged ? tp++ : fn++; else flagged ? fp++ : tn++;
  }
  // a share of nothing is no number: no part flagged has no precision, no labelled defect no recall
  return { tp, fp, tn, fn, precision: tp + fp ? tp / (tp + fp) : null, recall: tp + fn ? tp / (tp + fn) : null };
}

function showCounts() {
  const threshold = Number($("slider").value);
  const c = counts(threshold);
  $("threshold-value").textContent = threshold.toPrecision(5);
  for (const key of ["tp", "fp", "tn", "fn"]) $(key).textContent = c[key];
  $("fp-count").textContent = c.fp;
  $("fn-count").textContent = c.fn;
  $("precision").textContent = c.precision === null ? "n/a (nothing flagged)" : c.precision.toFixed(3);
  $("recall").textContent = c.recall === null ? "n/a (no labelled defect)" : c.recall.toFixed(3);
  drawHistogram(threshold);
  drawRoc();
}

// Charts are SVG: axes, ticks and legends are text a reader (and a test) can find.
const CHART = { left: 40, right: 16, top: 22, bottom: 34 };

function svgText(x, y, text, anchor = "middle", extra = "") {
  return `<text x="${x}" y="${y}" text-anchor="${anchor}" ${extra}>${esc(String(text))}</text>`;
}

function axes(width, height, xTicks, yTicks, xTitle, yTitle) {
  const { left, right, top, bottom } = CHART, x1 = width - right, y1 = height - bottom;
  let out = `<path class="axis" d="M${left},${top} V${y1} H${x1}"/>`;
  for (const [x, label] of xTicks) out += `<path class="tick" d="M${x},${y1} v4"/>` + svgText(x, y1 + 14, label);
  for (const [y, label] of yTicks) out += `<path class="tick" d="M${left},${y} h-4"/>` + svgText(left - 6, y + 4, label, "end");
  out += svgText((left + x1) / 2, height - 4, xTitle, "middle", 'class="title"');
  out += svgText(12, (top + y1) / 2, yTitle, "middle", `class="title" transform="rotate(-90 12 ${(top + y1) / 2})"`);
  return out;
}

function drawHistogram(threshold) {
  const svg = $("histogram"), [width, height] = [420, 220], scores = state.labelled.map((i) => i.score);
  const low = Math.min(...scores, threshold), high = Math.max(...scores, threshold), bins = 30;
  const span = high - low || 1, good = new Array(bins).fill(0), bad = new Array(bins).fill(0);
  for (const image of state.labelled) {
    const bin = Math.min(bins - 1, Math.floor((image.score - low) / span * bins));
    (image.label === 1 ? bad : good)[bin]++;
  }
  const top = Math.max(1, ...good, ...bad), { left, right, top: y0, bottom } = CHART;
  const plotW = width - left - right, plotH = height - y0 - bottom, w = plotW / bins;
  const xOf = (score) => left + (score - low) / span * plotW, yOf = (count) => y0 + plotH - count / top * plotH;
  let body = "";
  for (let b = 0; b < bins; b++) {
    if (good[b]) body += `<rect class="good" x="${left + b * w}" y="${yOf(good[b])}" width="${w / 2}" height="${plotH - yOf(good[b]) + y0}"/>`;
    if (bad[b]) body += `<rect class="defective" x="${left + b * w + w / 2}" y="${yOf(bad[b])}" width="${w / 2}" height="${plotH - yOf(bad[b]) + y0}"/>`;
  }
  const x = xOf(threshold);
  body += `<path class="threshold" d="M${x},${y0} V${y0 + plotH}"/>`;
  const xTicks = [low, (low + high) / 2, high].map((v) => [xOf(v), v.toPrecision(3)]);
  const yTicks = [0, Math.ceil(top / 2), top].map((v) => [yOf(v), v]);
  const legend = `<rect class="good" x="${left + 6}" y="6" width="10" height="10"/>` + svgText(left + 20, 15, "good", "start") +
    `<rect class="defective" x="${left + 66}" y="6" width="10" height="10"/>` + svgText(left + 80, 15, "defective", "start") +
    `<path class="threshold" d="M${left + 156},6 v10"/>` + svgText(left + 162, 15, "threshold", "start");
  svg.innerHTML = axes(width, height, xTicks, yTicks, "anomaly score (labelled images)", "images") + body + legend;
}

function drawRoc() {
  const svg = $("roc"), size = 240, { left, right, top, bottom } = CHART;
  const plotW = size - left - right, plotH = size - top - bottom;
  const sorted = [...state.labelled].sort((a, b) => b.score - a.score);
  const positives = sorted.filter((i) => i.label === 1).length || 1, negatives = sorted.length - positives || 1;
  const px = (far) => left + far * plotW, py = (recall) => top + plotH - recall * plotH;
  let tp = 0, fp = 0, path = `M${px(0)},${py(0)}`;
  for (const image of sorted) { image.label === 1 ? tp++ : fp++; path += ` L${px(fp / negatives)},${py(tp / positives)}`; }
  const c = counts(Number($("slider").value));
  const point = [px(c.fp / negatives), py(c.tp / positives)];
  const ticks = [0, 0.5, 1];
  svg.innerHTML = axes(size, size, ticks.map((v) => [px(v), v]), ticks.map((v) => [py(v), v]), "false-alarm rate", "recall") +
    `<path class="chance" d="M${px(0)},${py(0)} L${px(1)},${py(1)}"/><path class="roc" d="${path}"/>` +
    `<circle class="operating" cx="${point[0]}" cy="${point[1]}" r="4"/>` +
    svgText(left + 4, 15, "ROC; dot: the slider's threshold", "start");
}

async function loadThreshold() {
  try {
    await loadLabelled();
  } catch (error) {
    $("threshold-empty").hidden = error.status !== 404;
    $("threshold-body").hidden = error.status === 404;
    if (error.status !== 404) say(error.message);
    return;
  }
  $("threshold-empty").hidden = true;
  $("threshold-body").hidden = false;
  const scores = state.labelled.map((i) => i.score);
  const slider = $("slider");
  slider.min = Math.min(...scores);
  slider.max = Math.max(...scores) * 1.01;
  slider.value = state.threshold ?? slider.min;
  showCounts();
}

async function saveThreshold(overwrite = false) {
  const name = $("threshold-name").value.trim();
  if (!name) { say("name the new model first"); return; }
  try {
    const body = await (await api(`/v1/models/${state.model}/threshold`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ threshold: Number($("slider").value), name, overwrite }),
    })).json();
    say(`saved ${body.model.name} with threshold ${body.model.threshold.toPrecision(5)}`);
    await loadModels();
  } catch (error) {
    if (error.status === 409 && !overwrite && confirm(`${error.message}. Replace it?`)) return saveThreshold(true);
    say(error.message);
  }
}

// -- Model card -------------------------------------------------------------------------
function frameChoice(choice) {
  if (!choice) return null;
  if (!choice.chosen) return choice.reason;
  const evidence = choice.candidates[choice.chosen];
  return `${choice.chosen}: chosen from good images alone, ${(100 * evidence.recall_at_1pct).toFixed(0)}% of ` +
    `${choice.synthetic_images} synthetic defects above the held-out good scores' 1% tail` +
    ((choice.within_noise || []).length ? `; ${choice.within_noise.join(", ")} did as well within the probe's noise (a near tie)` : "");
}

function turnsChoice(turns) {
  if (!turns) return null;
  return `${turns.chosen}: ${(100 * turns.recall_at_1pct_with).toFixed(0)}% of the synthetic defects caught with each ` +
    `image's turns, ${(100 * turns.recall_at_1pct_without).toFixed(0)}% without (on only beyond two standard errors)`;
}

async function loadCard() {
  try {
    const manifest = await (await api(`/v1/models/${state.model}`)).json();
    const calibration = manifest.calibration || {};
    const summary = manifest.train_summary || {};
    let drift;  // the drift check on the served version's audited verdicts; 404 without an audit trail
    try { drift = (await (await api(`/v1/models/${state.model}/drift`)).json()).message; } catch (error) { drift = error.message; }
    const rows = {
      detector: manifest.detector, backbone: manifest.backbone ? manifest.backbone.name : "none",
      frame: manifest.preprocess ? `${manifest.preprocess.image_size} px short side, crop ${manifest.preprocess.crop ?? "none"}, aspect ${(manifest.preprocess.aspect ?? 1).toFixed(3)}` : "",
      "frame choice": frameChoice(summary.frame_choice),
      rotations: turnsChoice((summary.frame_choice || {}).rotations) ?? (manifest.config || {}).rotations,
      "global view": (summary.global_view_choice || {}).chosen ?? (manifest.config || {}).global_view,  // decided without a probe (with rotations)
      threshold: calibration.threshold, method: `${calibration.method} ${calibration.param}`,
      "false-alarm rate": calibration.false_alarm_rate == null ? null : `${(100 * calibration.false_alarm_rate).toFixed(2)}%` +
        (calibration.false_alarm_interval ? ` (95% interval ${(100 * calibration.false_alarm_interval[0]).toFixed(2)}% to ${(100 * calibration.false_alarm_interval[1]).toFixed(2)}%)` : ""),
      recall: calibration.recall == null ? null : calibration.recall.toFixed(3),
      "calibration images": calibration.good_count, "training images": summary.images,
      "taught images": (summary.taught || []).reduce((n, t) => n + t.images, 0), created: manifest.created, drift,
    };
    $("card-summary").innerHTML = Object.entries(rows).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v ?? "-")}</dd>`).join("");
    $("manifest").textContent = JSON.stringify(manifest, null, 2);
    await loadVersions();
  } catch (error) { say(error.message); }
}

async function loadVersions() {
  const body = $("versions").querySelector("tbody");
  body.innerHTML = "";
  let history;
  try { history = await (await api(`/v1/models/${state.model}/versions`)).json(); } catch (error) {
    $("versions-note").textContent = error.message;  // an exported model keeps no versions
    return;
  }
  const behind = history.served !== history.active;  // changed on disk (command line): served until a reload
  $("versions-note").textContent = `${history.versions.length} version(s); the active one is marked` + (behind
    ? `; this service still judges with version ${history.served}: reload the model to serve the active one` : "");
  body.innerHTML = history.versions.slice().reverse().map((v) => {
    const active = v.version === history.active;
    const action = active ? "<b>active</b>" : v.version === history.served ? "<b>served until a reload</b>"
      : v.pruned ? "<i>file pruned</i>"  // its entry stays; it cannot be made active
      : `<button class="engineer promote" data-version="${esc(v.version)}">promote</button>`;
    return `<tr class="${active ? "active" : ""}"><td><code>${esc(v.version)}</code></td><td>${esc(v.parent || "-")}</td>` +
      `<td>${esc(v.action)}</td><td>${esc(v.time.replace("T", " ").slice(0, 19))}</td><td>${action}</td></tr>`;
  }).join("");
  const engineer = !$("rollback").closest(".engineer").hidden;
  body.querySelectorAll(".promote").forEach((button) => {
    button.hidden = !engineer;
    button.onclick = () => changeVersion("promote", { version: button.dataset.version });
  });
}

async function changeVersion(action, body) {
  try {
    const options = { method: "POST" };
    if (body) Object.assign(options, { body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
    const model = await (await api(`/v1/models/${state.model}/${action}`, options)).json();
    say(`${state.model}: version ${model.version} is active`);
    await loadCard();
  } catch (error) { say(error.message); }
}

// -- History ----------------------------------------------------------------------------
const HISTORY_ROWS = 50;

async function loadHistory() {
  const params = new URLSearchParams({ limit: HISTORY_ROWS });
  if ($("history-verdict").value) params.set("verdict", $("history-verdict").value);
  if ($("history-model").checked && state.model) params.set("model", state.model);
  const body = $("history-table").querySelector("tbody");
  try {
    const page = await (await api(`/v1/audit?${params}`)).json();
    const kept = new Set(page.kept);
    $("history-note").textContent = `the last ${page.records.length} verdicts${kept.size ? `, ${kept.size} with the image kept` : ""}`;
    body.innerHTML = page.records.map((r) => `<tr class="${esc(r.verdict)}"><td>${esc(r.time.replace("T", " ").slice(0, 19))}</td>` +
      `<td>${esc(r.model)}</td><td><code>${esc(r.model_version)}</code></td><td>${esc(r.image_name)}</td>` +
      `<td>${r.score == null ? "-" : r.score.toFixed(3)}</td><td>${r.normalized == null ? "-" : r.normalized.toFixed(3)}</td>` +
      `<td><span class="badge ${esc(r.verdict)}">${esc(r.verdict)}</span></td><td>${esc(r.role)}</td>` +
      `<td>${kept.has(r.id) ? `<span class="overlaid"><img class="kept" data-id="${r.id}" alt="kept image">` +
        `<img class="heat" alt="heatmap" hidden></span>` : "-"}</td></tr>`).join("");
    for (const img of body.querySelectorAll("img.kept")) {
      img.src = await blobUrl(`/v1/audit/${img.dataset.id}/image`);
      const heat = img.nextElementSibling;  // the map behind the verdict, over the image; why not, when it cannot be had
      blobUrl(`/v1/audit/${img.dataset.id}/heatmap`).then((u) => { heat.src = u; heat.hidden = false; },
                                                         (error) => { img.title = `no heatmap: ${error.message}`; });
    }
  } catch (error) { body.innerHTML = ""; $("history-note").textContent = error.message; }
}

// -- Review and teach -------------------------------------------------------------------
async function loadReview() {
  try { await loadLabelled(); } catch (error) { say(error.message); return; }
  const threshold = state.threshold;
  const picked = state.labelled.filter((i) => (i.label === 0 && i.score >= threshold) || Math.abs(i.score / threshold - 1) < 0.15);
  picked.sort((a, b) => b.score - a.score);
  state.review.clear();
  $("review-list").innerHTML = picked.length ? "" : "No false alarms and nothing near the threshold.";
  for (const image of picked) {
    const tile = document.createElement("div");
    tile.className = "tile review";
    tile.innerHTML = `<div class="pair"><img alt="image ${image.id}"><img alt="heatmap ${image.id}"></div>
      <div>${esc(image.name)} (${esc(image.defect)})</div><div>score ${image.score.toFixed(3)}</div>
      ${image.label === 1 ? '<div class="labelled-defect">labelled defective: cannot be taught as good</div>'
        : `<label><input type="checkbox" data-id="${image.id}"> mark as good</label>`}`;
    const box = tile.querySelector("input");
    if (box) box.onchange = (e) => e.target.checked ? state.review.add(image.id) : state.review.delete(image.id);
    $("review-list").appendChild(tile);
    const [original, heat] = tile.querySelectorAll("img");
    blobUrl(`/v1/models/${state.model}/labelled/${image.id}/image`).then((u) => { original.src = u; });
    blobUrl(`/v1/models/${state.model}/labelled/${image.id}/heatmap`).then((u) => { heat.src = u; });
  }
}

async function teach(overwrite = false, acceptDefectLike = false) {
  const name = $("teach-name").value.trim();
  if (!name || !state.review.size) { say("mark images as good and name the new model"); return; }
  say("learning " + state.review.size + " image(s)...");
  try {
    const body = await (await api(`/v1/models/${state.model}/teach`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ images: [...state.review], name, overwrite, accept_defect_like: acceptDefectLike }),
    })).json();
    const learned = Object.entries(body.details).filter(([, v]) => Number.isInteger(v)).map(([k, v]) => `${k.replaceAll("_", " ")} ${v}`);
    $("teach-result").textContent = `${body.model.name}: ${learned.join(", ")}; threshold ${body.model.threshold.toPrecision(5)}` +
      (body.details.warning ? `. Warning: ${body.details.warning}` : "");
    say("");
    await loadModels();
  } catch (error) {
    if (error.status === 409 && !overwrite && confirm(`${error.message}. Replace it?`)) return teach(true, acceptDefectLike);
    if (error.status === 400 && !acceptDefectLike && error.message.includes("look defective")
        && confirm(`${error.message}.\n\nTeach them as good anyway?`)) return teach(overwrite, true);
    say(error.message);
  }
}

// -- wiring -----------------------------------------------------------------------------
document.querySelectorAll("nav button").forEach((b) => { b.onclick = () => tab(b.dataset.tab); });
$("model").onchange = () => { state.model = $("model").value; tab(document.querySelector("nav .active").dataset.tab); };
$("token").value = sessionStorage.getItem("token") || "";
$("token").onchange = () => { sessionStorage.setItem("token", $("token").value); loadModels(); };
$("files").onchange = () => inspect([...$("files").files]);
$("drop").ondragover = (e) => { e.preventDefault(); $("drop").classList.add("over"); };
$("drop").ondragleave = () => $("drop").classList.remove("over");
$("drop").ondrop = (e) => { e.preventDefault(); $("drop").classList.remove("over"); inspect([...e.dataTransfer.files]); };
$("opacity").oninput = () => { $("detail-heat").style.opacity = $("opacity").value; };
$("slider").oninput = showCounts;
$("save-threshold").onclick = () => saveThreshold();
$("teach").onclick = () => teach();
$("rollback").onclick = () => changeVersion("rollback");
$("history-refresh").onclick = loadHistory;
$("history-verdict").onchange = loadHistory;
$("history-model").onchange = loadHistory;
$("detail-heat").style.opacity = $("opacity").value;
loadModels();
