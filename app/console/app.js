// HDM Serve console: key entry, page routing (#page or #training/<job id>), Datasets, System.
// Generate/Gallery live in generate.js, Training in training.js, Models and Adapters in models.js.
// Only the public REST API is used.
import { api } from "./api.js";
import { $, ago, badge, el, params, showError } from "./dom.js";
import { initGenerate, showGallery, showGenerate } from "./generate.js";
import { initModels, showModels } from "./models.js";
import { initTraining, leaveTrainJob, showTrainJob, showTraining } from "./training.js";
import { initUpload } from "./upload.js";

const PAGES = {
  generate: showGenerate, gallery: showGallery, training: showTraining, datasets: showDatasets,
  models: showModels, system: showSystem,
};
let ready = false, sysTimer = null, dsTimer = null;

async function probe() {
  // GET /v1/system answers 401 when a key is required and missing or wrong: nothing is shown without one.
  try {
    await api.request("GET", "/v1/system");
    return null;
  } catch (e) {
    return e;
  }
}

function showKeyPanel(err) {
  ready = false;
  leaveTrainJob();
  for (const s of document.querySelectorAll(".page")) s.hidden = true;
  $("nav").hidden = true;
  $("boot").hidden = true;
  $("key-panel").hidden = false;
  $("key-change").hidden = true;
  $("key-state").textContent = "API key required";
  if (err && api.key) showError($("key-error"), { ...err, message: `The service refused this key. ${err.message}` });
  else showError($("key-error"), null);
  $("api-key").focus();
}

function showApp(open) {
  ready = true;
  $("key-panel").hidden = true;
  $("boot").hidden = true;
  $("nav").hidden = false;
  $("key-change").hidden = open;
  $("key-state").textContent = open ? "open service (no key needed)" : "key accepted";
  route();
}

async function start() {
  const err = await probe();
  if (!err) return showApp(!api.key);
  if (err.status === 401) return showKeyPanel(api.key ? err : null);
  $("boot").textContent = `The service did not answer: ${err.message}`;
}

async function submitKey(ev) {
  ev.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  api.setKey(key);
  const err = await probe();
  if (!err) {
    $("api-key").value = "";
    showError($("key-error"), null);
    return showApp(false);
  }
  api.setKey("");
  showError($("key-error"), err.status === 401
    ? { ...err, message: `The service refused this key. ${err.message}` } : err);
  $("api-key").select();
}

async function route() {
  if (!ready) return;
  const [page, arg] = (location.hash.slice(1) || "generate").split("/");
  clearInterval(sysTimer);
  clearInterval(dsTimer);
  const target = page === "training" && arg ? "trainjob" : PAGES[page] ? page : "generate";
  if (target !== "trainjob") leaveTrainJob();
  for (const s of document.querySelectorAll(".page")) s.hidden = s.id !== `page-${target}`;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.page === (target === "trainjob" ? "training" : target)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  try {
    if (target === "trainjob") showTrainJob(arg);
    else await PAGES[target]();
  } catch (e) {
    if (e.status !== 401) console.error(e);
  }
}

// ---- Datasets --------------------------------------------------------------------------------------------
async function submitDataset(ev) {
  ev.preventDefault();
  showError($("ds-error"), null);
  try {
    await api.post("/v1/datasets", { name: $("ds-name").value, path: $("ds-path").value });
    $("ds-form").reset();
    await showDatasets();
  } catch (e) {
    showError($("ds-error"), e);
  }
}

async function showDatasets() {
  const list = await api.get("/v1/datasets?limit=100");
  $("ds-list").replaceChildren(...list.data.map(datasetCard));
  if (!list.data.length) $("ds-list").append(el("p", { class: "muted" }, "No datasets registered yet."));
  clearInterval(dsTimer);
  if (list.data.some((d) => d.status === "validating")) dsTimer = setTimeout(showDatasets, 1000);
}

function datasetCard(d) {
  const s = d.stats || {};
  const hist = Object.entries(s.size_histogram || {});
  const names = (title, arr) => (arr && arr.length
    ? el("details", {}, el("summary", {}, `${title}: ${arr.length}`), el("ul", {}, ...arr.map((n) => el("li", {}, n))))
    : el("p", {}, `${title}: 0`));
  return el("article", { class: "card dataset", dataset: { id: d.id, status: d.status } },
    el("h3", {}, d.name, " ", badge(d.status)),
    el("p", { class: "muted" }, `${d.id} · ${d.path} · ${ago(d.created_at)}`),
    d.error ? el("p", { class: "error" }, d.error.message || JSON.stringify(d.error)) : null,
    d.stats ? el("div", { class: "report" },
      el("p", {}, `${s.images ?? 0} images, ${s.captioned ?? 0} with captions`),
      names("missing captions", s.missing_captions), names("unreadable", s.unreadable),
      names("oversized", s.oversized),
      hist.length ? el("table", { class: "list" }, el("caption", {}, "Image sizes"),
        el("thead", {}, el("tr", {}, el("th", {}, "size"), el("th", {}, "images"))),
        el("tbody", {}, ...hist.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, String(v)))))) : null)
      : el("p", { class: "muted" }, "validation running…"));
}

// ---- System ----------------------------------------------------------------------------------------------
async function showSystem() {
  const [sys, ready] = await Promise.all([api.get("/v1/system"),
    fetch("/readyz").then((r) => r.json()).catch(() => null)]);
  const body = $("sys-body");
  const table = (head, rows) => el("table", { class: "list" },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c))))));
  body.replaceChildren(
    el("p", {}, `Mode: ${sys.mode}`),
    el("h3", {}, "Slots (GPUs) and leases"),
    table(["slot", "job", "worker", "heartbeat"], sys.gpus.map((g) => [String(g.index),
      g.job ? (g.job.startsWith("train_") ? el("a", { href: `#training/${g.job}` }, g.job) : g.job) : "free",
      g.worker || "–", ago(g.heartbeat_at)])),
    el("h3", {}, "Workers running jobs"),
    sys.workers.length ? el("ul", {}, ...sys.workers.map((w) => el("li", {}, w))) : el("p", { class: "muted" }, "none busy"),
    el("h3", {}, "Queues"),
    table(["kind", "queued", "running"], Object.keys(sys.queue_depth).map((k) =>
      [k, String(sys.queue_depth[k]), String(sys.running?.[k] ?? 0)])),
    ready ? el("h3", {}, "Readiness (/readyz)") : null, ready ? params(ready) : null);
  sysTimer = setTimeout(() => { if (location.hash === "#system") showSystem().catch(() => {}); }, 3000);
}

// ---- start -----------------------------------------------------------------------------------------------
api.onUnauthorized = (e) => showKeyPanel(e);
$("key-form").addEventListener("submit", submitKey);
$("key-change").addEventListener("click", () => { api.setKey(""); showKeyPanel(null); });
$("ds-form").addEventListener("submit", submitDataset);
window.addEventListener("hashchange", route);
initGenerate();
initTraining();
initModels();
initUpload(() => showDatasets());
start();
