// Training: start a job (POST /v1/train-jobs), the job list, and one job's page with live loss / LR curves from
// its event stream, throughput, ETA, checkpoints and adapters ("generate with this"), sample images, cancel, resume.
import { addAdapter } from "./adapters.js";
import { api, apiPath } from "./api.js";
import { drawChart } from "./chart.js";
import { $, ago, badge, bytes, duration, el, showError } from "./dom.js";
import { fillForm } from "./generate.js";

// Starting points people change; the server validates every field (422 names the field).
const PRESETS = {
  pretrain: { precision: "bf16", ckpt: 1000, stage: { resolution: 256, steps: 20000, batch_size: 64, lr: 3e-4,
    warmup_steps: 1000, tread_rate: 0.5 } },
  finetune: { precision: "bf16", ckpt: 500, stage: { resolution: 1024, steps: 2000, batch_size: 8, lr: 1e-5,
    warmup_steps: 100, tread_rate: 0.5 } },
  // HDM's adapter recipe (hdm_core/train/config.py ADAPTER_RECIPE_*): LoKr at lr 0.1, 100 warm-up steps
  adapter: { precision: "bf16", ckpt: 500, stage: { resolution: 1024, steps: 2000, batch_size: 8, lr: 0.1,
    warmup_steps: 100, tread_rate: 0.5 } },
};
const STAGE_FIELDS = [
  ["resolution", "Resolution", 16, 1], ["steps", "Steps", 1, 1], ["batch_size", "Batch", 1, 1],
  ["lr", "Learning rate", 0, "any"], ["warmup_steps", "Warm-up", 0, 1], ["tread_rate", "TREAD rate", 0, 0.05],
];
const FINAL = ["succeeded", "failed", "cancelled"];
const view = { id: null, ctl: null, loss: [], lr: [], lastEvent: 0, timer: null, job: null, drawQueued: false,
  samples: new Map() }; // sample name -> blob: URL (fetched once with the key)

export function initTraining() {
  $("train-preset").addEventListener("change", () => applyPreset($("train-preset").value));
  $("train-add-stage").addEventListener("click", () => addStage(readStages().at(-1) || PRESETS.pretrain.stage));
  $("train-form").addEventListener("submit", submit);
  $("tj-cancel").addEventListener("click", () => action("cancel"));
  $("tj-resume").addEventListener("click", () => action("resume"));
  applyPreset("pretrain");
  window.addEventListener("resize", draw);
}

function applyPreset(name) {
  const p = PRESETS[name];
  $("train-arch-box").hidden = name !== "pretrain";
  $("train-base-box").hidden = name === "pretrain";
  $("train-adapter").hidden = name !== "adapter";
  $("train-precision").value = p.precision;
  $("train-ckpt-every").value = p.ckpt;
  $("train-stages").replaceChildren();
  addStage(p.stage);
}

function addStage(values) {
  const box = $("train-stages");
  const n = box.children.length;
  const row = el("div", { class: "grid stage" },
    ...STAGE_FIELDS.map(([key, label, min, step]) => el("div", {},
      el("label", { for: `stage-${n}-${key}` }, `Stage ${n + 1} ${label.toLowerCase()}`),
      el("input", { id: `stage-${n}-${key}`, type: "number", min: String(min), step: String(step),
        value: String(values[key]), dataset: { key } }))),
    n ? el("button", { type: "button", on: { click: () => row.remove() } }, `Remove stage ${n + 1}`) : null);
  box.append(row);
}

function readStages() {
  return [...$("train-stages").children].map((row) => Object.fromEntries(
    [...row.querySelectorAll("input")].map((i) => [i.dataset.key, Number(i.value)])));
}

/** The [adapter] section of an adapter job (AdapterSpec in app/schemas.py). */
function readAdapter() {
  const words = $("ad-trigger").value.split(",").map((s) => s.trim()).filter(Boolean);
  return {
    algorithm: $("ad-algorithm").value, factor: Number($("ad-factor").value), rank: Number($("ad-rank").value),
    alpha: Number($("ad-alpha").value), full_matrix: $("ad-full-matrix").checked,
    train_norm: $("ad-train-norm").checked, trigger_words: words,
  };
}

/** The request body, exactly what a script would POST to /v1/train-jobs. */
function readForm() {
  const preset = $("train-preset").value;
  const prompts = $("train-sample-prompts").value.split("\n").map((s) => s.trim()).filter(Boolean);
  return {
    name: $("train-name").value, dataset: $("train-dataset").value,
    base_model: preset !== "pretrain" ? $("train-base").value || null : null,
    ...(preset === "adapter" ? { adapter: readAdapter() } : {}),
    ...(preset === "pretrain" ? { arch: $("train-arch").value || null } : {}),
    precision: $("train-precision").value, gpus: Number($("train-gpus").value),
    text_max_length: Number($("train-text-len").value), checkpoint_every: Number($("train-ckpt-every").value),
    keep_last_n: Number($("train-keep").value), sample_every: Number($("train-sample-every").value),
    sample_prompts: prompts, seed: Number($("train-seed").value), stages: readStages(),
  };
}

async function submit(ev) {
  ev.preventDefault();
  showError($("train-error"), null);
  $("train-submit").disabled = true;
  try {
    const job = await api.post("/v1/train-jobs", readForm());
    location.hash = `#training/${job.id}`;
  } catch (e) {
    showError($("train-error"), e);
  } finally {
    $("train-submit").disabled = false;
  }
}

export async function showTraining() {
  const [datasets, models, jobs] = await Promise.all([
    api.get("/v1/datasets?limit=100"), api.get("/v1/models?limit=100"), api.get("/v1/train-jobs?limit=50")]);
  const ds = $("train-dataset"), keepDs = ds.value;
  ds.replaceChildren(...datasets.data.filter((d) => d.status === "ready").map((d) =>
    el("option", { value: d.id }, `${d.name} (${d.stats?.captioned ?? "?"} captioned images)`)));
  if (!ds.options.length) ds.append(el("option", { value: "" }, "no ready dataset: register one under Datasets"));
  if ([...ds.options].some((o) => o.value === keepDs)) ds.value = keepDs;
  const base = $("train-base"), keepBase = base.value;
  base.replaceChildren(...models.data.map((m) => el("option", { value: m.id }, m.name)));
  if ([...base.options].some((o) => o.value === keepBase)) base.value = keepBase;
  $("train-list").replaceChildren(...jobs.data.map((j) => el("tr", {},
    el("td", {}, el("a", { href: `#training/${j.id}` }, j.name || j.id), el("br"), el("small", {}, ago(j.created_at))),
    el("td", {}, badge(j.status)), el("td", {}, `${j.step ?? 0}/${j.total_steps ?? "?"}`),
    el("td", {}, j.metrics?.loss != null ? j.metrics.loss.toFixed(4) : "–"))));
  if (!jobs.data.length) $("train-list").append(el("tr", {}, el("td", { colspan: "4" }, "No training jobs yet.")));
}

// ---- one job ---------------------------------------------------------------------------------------------
export function showTrainJob(id) {
  if (view.id !== id) {
    leaveTrainJob();
    Object.assign(view, { id, loss: [], lr: [], lastEvent: 0, job: null });
    $("tj-log").replaceChildren();
    $("tj-samples").replaceChildren();
    $("tj-adapters").replaceChildren();
    delete $("tj-samples").dataset.names;
    delete $("tj-adapters").dataset.ids;
    $("tj-title").textContent = `Training job ${id}`;
    draw();
    follow();
  }
  refresh();
  clearInterval(view.timer);
  view.timer = setInterval(refresh, 3000);
}

export function leaveTrainJob() {
  clearInterval(view.timer);
  view.timer = null;
  if (view.ctl) view.ctl.abort();
  view.ctl = null;
  view.id = null;
  for (const url of view.samples.values()) URL.revokeObjectURL(url);
  view.samples.clear();
}

/** Streams events from the last one seen; a resumed run reconnects from there. */
function follow() {
  if (view.ctl) view.ctl.abort();
  const ctl = new AbortController();
  view.ctl = ctl;
  const id = view.id;
  api.follow(`/v1/train-jobs/${id}/events`, { after: view.lastEvent, signal: ctl.signal, onEvent: onEvent })
    .then((last) => { view.lastEvent = last; })
    .catch((e) => showError($("tj-error"), e))
    .finally(() => { if (view.ctl === ctl) view.ctl = null; });
}

function onEvent(ev) {
  view.lastEvent = ev.id ?? view.lastEvent;
  const d = ev.data;
  if (ev.type === "metrics") {
    if (d.loss != null) view.loss.push([d.step, d.loss]);
    if (d.lr != null) view.lr.push([d.step, d.lr]);
    view.lastMetrics = d;
    scheduleDraw();
    return;
  }
  const text = ev.type === "status" ? `status ${d.status}${d.reason ? ` (${d.reason})` : ""}${d.error ? `: ${d.error.message}` : ""}`
    : ev.type === "log" ? d.message : ev.type;
  const log = $("tj-log");
  log.prepend(el("li", {}, text));
  while (log.children.length > 50) log.lastChild.remove();
  if (ev.type === "status" || ev.type === "done" || ev.type === "log") refresh();
}

function scheduleDraw() {
  if (view.drawQueued) return;
  view.drawQueued = true;
  requestAnimationFrame(() => { view.drawQueued = false; draw(); });
}

function draw() {
  drawChart($("tj-loss"), view.loss, { label: "loss", color: "#dc2626" });
  drawChart($("tj-lr"), view.lr, { label: "learning rate", color: "#2563eb" });
}

async function refresh() {
  const id = view.id;
  if (!id) return;
  try {
    const [job, ckpts, samples] = await Promise.all([api.get(`/v1/train-jobs/${id}`),
      api.get(`/v1/train-jobs/${id}/checkpoints`), api.get(`/v1/train-jobs/${id}/samples`)]);
    if (view.id !== id) return;
    view.job = job;
    renderJob(job);
    renderCheckpoints(ckpts.data, job);
    await renderAdapters(job);
    await renderSamples(samples.data);
    if (!FINAL.includes(job.status) && !view.ctl) follow(); // resumed, or the stream ended early
  } catch (e) {
    showError($("tj-error"), e);
  }
}

function renderJob(job) {
  const m = job.metrics || {}, last = view.lastMetrics || {};
  const ips = m.images_per_s ?? last.images_per_s;
  let eta = m.eta_s;
  if (eta == null && ips && job.total_steps && last.step_time_s) eta = (job.total_steps - job.step) * last.step_time_s;
  $("tj-title").textContent = `Training job ${job.name || ""} ${job.id}`.replace("  ", " ");
  const stat = (k, v) => el("div", {}, el("span", { class: "k" }, k), el("span", { class: "v" }, v));
  $("tj-stats").replaceChildren(
    stat("status", badge(job.status)), stat("stage", last.stage_name ?? job.stage ?? "–"),
    stat("step", `${job.step ?? 0} / ${job.total_steps ?? "?"}`),
    stat("loss", m.loss != null ? m.loss.toFixed(4) : "–"), stat("learning rate", m.lr != null ? m.lr.toExponential(2) : "–"),
    stat("throughput", ips != null ? `${ips.toFixed(1)} images/s` : "–"), stat("ETA", duration(eta)),
    stat("GPUs", (job.gpus || []).join(", ") || "–"), stat("dataset", job.dataset || "–"),
    stat("base model", job.base_model || "from scratch"));
  $("tj-progress").max = Math.max(job.total_steps || 1, 1);
  $("tj-progress").value = job.step || 0;
  $("page-trainjob").dataset.status = job.status;
  $("tj-cancel").disabled = FINAL.includes(job.status);
  $("tj-resume").disabled = !["failed", "cancelled"].includes(job.status);
  if (job.error) showError($("tj-error"), job.error);
}

function renderCheckpoints(list, job) {
  const ul = $("tj-checkpoints");
  ul.replaceChildren(...list.map((c) => el("li", { class: "checkpoint" },
    `step ${c.step} · ${c.id} `,
    el("button", { type: "button", class: "gen-with", on: { click: () => {
      fillForm({ model: c.id });
      location.hash = "#generate";
    } } }, "Generate with this"))));
  if (!list.length) {
    ul.append(el("li", { class: "muted" }, job.request?.adapter
      ? "none: an adapter job leaves the base model as it is (its adapters are listed next to this)" : "none yet"));
  }
}

/** The adapters the job registered (one per snapshot, and the final one), newest first. */
async function renderAdapters(job) {
  const ul = $("tj-adapters");
  if (!job.adapters || !job.adapters.length) {
    ul.replaceChildren(el("li", { class: "muted" }, job.request?.adapter ? "none yet" : "not an adapter job"));
    return;
  }
  if (ul.dataset.ids === job.adapters.join()) return;
  const list = await Promise.all(job.adapters.map((a) => api.get(`/v1/adapters/${encodeURIComponent(a)}`)));
  ul.dataset.ids = job.adapters.join();
  ul.replaceChildren(...list.reverse().map((a) => el("li", { class: "adapter", dataset: { id: a.id } },
    `${a.name} · ${a.steps ?? "?"} steps · ${bytes(a.size_bytes)} `,
    el("button", { type: "button", class: "gen-with", on: { click: () => {
      fillForm({ model: job.base_model });
      addAdapter(a, 1);
      location.hash = "#generate";
    } } }, "Generate with this"))));
}

/** Sample images as they are drawn: each file is fetched once with the key and shown from a blob: URL. */
async function renderSamples(files) {
  const id = view.id;
  const newest = [...files].sort((a, b) => b.name.localeCompare(a.name, undefined, { numeric: true })).slice(0, 24);
  for (const s of newest) {
    if (view.samples.has(s.name)) continue;
    const url = await api.blobUrl(apiPath(s.url)).catch(() => null);
    if (view.id !== id) { if (url) URL.revokeObjectURL(url); return; }
    if (url) view.samples.set(s.name, url);
  }
  const shown = newest.filter((s) => view.samples.has(s.name));
  const box = $("tj-samples");
  if (box.dataset.names !== shown.map((s) => s.name).join()) {
    box.dataset.names = shown.map((s) => s.name).join();
    box.replaceChildren(...shown.map((s) => el("figure", { class: "sample" },
      el("img", { src: view.samples.get(s.name), alt: `sample ${s.name}` }), el("figcaption", {}, s.name))));
  }
  if (!shown.length) box.replaceChildren(el("p", { class: "muted" }, "none yet"));
  $("tj-samples-count").textContent = files.length ? `(${files.length}, newest first)` : "";
}

async function action(kind) {
  showError($("tj-error"), null);
  try {
    renderJob(await api.post(`/v1/train-jobs/${view.id}/${kind}`));
    if (kind === "resume") follow();
  } catch (e) {
    showError($("tj-error"), e);
  }
}
