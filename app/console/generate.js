// Generate (POST /v1/images, live progress from its event stream, cancel, results) and Gallery (GET /v1/images).
import { adapterText, initAdapters, loadAdapters, readAdapters, setAdapters } from "./adapters.js";
import { api, apiPath } from "./api.js";
import { $, badge, ago, downloadLink, el, params, showError } from "./dom.js";

const SIZES = [
  ["1024×1024 (1:1)", 1024, 1024], ["1152×896 (4:3)", 1152, 896], ["896×1152 (3:4)", 896, 1152],
  ["1344×768 (16:9)", 1344, 768], ["768×1344 (9:16)", 768, 1344], ["512×512 (1:1)", 512, 512],
  ["256×256 (1:1)", 256, 256], ["64×64 (1:1, tiny models)", 64, 64], ["32×32 (1:1, tiny models)", 32, 32],
];
const FINAL = ["succeeded", "failed", "cancelled"];
const state = { job: null, follow: null, lastSeed: null, initImage: null, mask: null, models: [] };

export function initGenerate() {
  const size = $("gen-size");
  for (const [label, w, h] of SIZES) size.append(el("option", { value: `${w}x${h}` }, label));
  size.append(el("option", { value: "custom" }, "custom"));
  size.addEventListener("change", () => {
    if (size.value === "custom") return;
    const [w, h] = size.value.split("x");
    $("gen-width").value = w;
    $("gen-height").value = h;
  });
  for (const id of ["gen-width", "gen-height"]) {
    $(id).addEventListener("input", () => {
      const v = `${$("gen-width").value}x${$("gen-height").value}`;
      size.value = [...size.options].some((o) => o.value === v) ? v : "custom";
    });
  }
  $("gen-model").addEventListener("change", updateSamplers);
  $("gen-form").addEventListener("submit", submit);
  $("gen-cancel").addEventListener("click", cancel);
  $("gen-seed-reuse").addEventListener("click", () => { $("gen-seed").value = state.lastSeed; });
  $("gen-init-clear").addEventListener("click", () => { setInitImage(null); $("gen-init-file").value = ""; });
  $("gen-init-file").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    setInitImage(f ? { src: URL.createObjectURL(f), data: await dataUrl(f) } : null);
  });
  $("gen-mask-file").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    state.mask = f ? await dataUrl(f) : null;
  });
  initAdapters();
  $("gal-filter").addEventListener("submit", (e) => { e.preventDefault(); gallery.cursors = [null]; showGallery(); });
  $("gal-older").addEventListener("click", () => { gallery.cursors.push(gallery.next); showGallery(); });
  $("gal-newer").addEventListener("click", () => { gallery.cursors.pop(); showGallery(); });
}

/** Models for the selects (Generate, Gallery filter); called when the page is shown. */
export async function loadModels() {
  const list = await api.get("/v1/models?limit=100");
  state.models = list.data;
  for (const [id, first] of [["gen-model", "(server default)"], ["gal-model", "any"]]) {
    const sel = $(id), keep = sel.value;
    sel.replaceChildren(el("option", { value: "" }, first),
      ...list.data.map((m) => el("option", { value: m.id }, m.step != null ? `${m.name} (step ${m.step})` : m.name)));
    if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  }
  updateSamplers();
  return list.data;
}

function updateSamplers() {
  const m = state.models.find((x) => x.id === $("gen-model").value) || state.models[0];
  const names = (m && m.samplers) || ["unipc"];
  const sel = $("gen-sampler"), keep = sel.value;
  sel.replaceChildren(...names.map((n) => el("option", {}, n)));
  if (names.includes(keep)) sel.value = keep;
  const schedules = (m && m.schedules) || [];
  const sch = $("gen-schedule"), keepSch = sch.value;
  sch.replaceChildren(el("option", { value: "" }, "sampler's default"), ...schedules.map((n) => el("option", {}, n)));
  if (schedules.includes(keepSch)) sch.value = keepSch;
}

const num = (id) => Number($(id).value);

/** The request body, exactly what a script would POST to /v1/images. */
export function readForm() {
  const body = {
    prompt: $("gen-prompt").value, negative_prompt: $("gen-negative").value,
    width: num("gen-width"), height: num("gen-height"), steps: num("gen-steps"),
    guidance_scale: num("gen-guidance"), sampler: $("gen-sampler").value, n: num("gen-n"),
    output_format: $("gen-format").value,
    camera: { x_shift: num("gen-cam-x"), y_shift: num("gen-cam-y"), zoom: num("gen-cam-zoom") },
    tread_guidance: { cond_rate: num("gen-tread-cond"), uncond_rate: num("gen-tread-uncond") },
  };
  if ($("gen-model").value) body.model = $("gen-model").value;
  if ($("gen-schedule").value) body.schedule = $("gen-schedule").value;
  if ($("gen-seed").value !== "") body.seed = Number($("gen-seed").value);
  const adapters = readAdapters();
  if (adapters) body.adapters = adapters;
  return { ...body, ...imageEditFields() };
}

// HOOK(image-editing): the init image and mask go as data URLs (POST /v1/images init_image / mask).
function imageEditFields() {
  if (!state.initImage || !state.initImage.data) return {};
  const fields = { init_image: state.initImage.data, strength: num("gen-strength") };
  if (state.mask) Object.assign(fields, { mask: state.mask, mask_blur: num("gen-mask-blur") });
  return fields;
}

/** A Blob (a chosen file, a result image) as a data: URL. */
function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

/** Fills the form from a job's request (Gallery "generate again", checkpoints "generate with this"). Adapters are
 *  replaced only when `req` names them (a checkpoint's "generate with this" keeps the picked ones). */
export function fillForm(req) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = v; };
  set("gen-prompt", req.prompt); set("gen-negative", req.negative_prompt);
  set("gen-width", req.width); set("gen-height", req.height); set("gen-steps", req.steps);
  set("gen-guidance", req.guidance_scale); set("gen-n", req.n); set("gen-format", req.output_format);
  if (req.model !== undefined) {
    const sel = $("gen-model");
    if (![...sel.options].some((o) => o.value === req.model)) sel.append(el("option", { value: req.model }, req.model));
    sel.value = req.model || "";
    updateSamplers();
  }
  set("gen-sampler", req.sampler);
  if ([...$("gen-schedule").options].some((o) => o.value === req.schedule)) $("gen-schedule").value = req.schedule;
  $("gen-seed").value = req.seed ?? "";
  const cam = req.camera || {}, tread = req.tread_guidance || {};
  set("gen-cam-x", cam.x_shift); set("gen-cam-y", cam.y_shift); set("gen-cam-zoom", cam.zoom);
  set("gen-tread-cond", tread.cond_rate); set("gen-tread-uncond", tread.uncond_rate);
  if (req.adapters !== undefined) setAdapters(req.adapters);
  $("gen-width").dispatchEvent(new Event("input"));
}

/** A job's request for people: its adapters as "name × weight" rather than JSON with hashes. */
function shownRequest(job) {
  const req = { ...job.request };
  delete req.adapters;
  if (job.adapters && job.adapters.length) req.adapters = adapterText(job.adapters);
  return req;
}

async function submit(ev) {
  ev.preventDefault();
  showError($("gen-error"), null);
  if (!$("gen-prompt").value.trim()) {
    showError($("gen-error"), { code: "invalid_value", message: "Write a prompt first.", param: "prompt" });
    $("gen-prompt").focus();
    return;
  }
  $("gen-submit").disabled = true;
  try {
    const job = await api.post("/v1/images", readForm());
    track(job);
  } catch (e) {
    showError($("gen-error"), e);
    $("gen-submit").disabled = false;
  }
}

function renderStatus(job) {
  const p = job.progress || { step: 0, total: 0 };
  const pos = job.status === "queued" && job.queue_position != null ? ` · position ${job.queue_position}` : "";
  $("gen-status").replaceChildren(badge(job.status), ` ${job.id} · step ${p.step}/${p.total}${pos}`);
  $("gen-progress").max = Math.max(p.total, 1);
  $("gen-progress").value = p.step;
  $("gen-job").dataset.status = job.status;
  if (job.error) showError($("gen-error"), job.error);
}

/** Follows one job: progress from its SSE stream, then the finished job's images. */
function track(job) {
  if (state.follow) state.follow.abort();
  state.job = job;
  const box = $("gen-job");
  box.dataset.progressEvents = "0";
  box.dataset.jobId = job.id;
  $("gen-results").replaceChildren();
  $("gen-params").replaceChildren();
  $("gen-cancel").disabled = false;
  renderStatus(job);
  const ctl = new AbortController();
  state.follow = ctl;
  api.follow(`/v1/images/${job.id}/events`, {
    signal: ctl.signal,
    onEvent: (ev) => {
      if (ev.type === "progress") {
        box.dataset.progressEvents = String(Number(box.dataset.progressEvents) + 1);
        state.job.progress = { step: ev.data.step, total: ev.data.total };
      } else if (ev.type === "status") {
        state.job.status = ev.data.status;
      }
      renderStatus(state.job);
    },
  }).catch((e) => showError($("gen-error"), e)).then(() => (ctl.signal.aborted ? null : finish(job.id)));
}

async function finish(id) {
  let job = await api.get(`/v1/images/${id}`);
  for (let i = 0; !FINAL.includes(job.status) && i < 600; i++) { // the stream dropped: poll
    await new Promise((r) => setTimeout(r, 500));
    job = await api.get(`/v1/images/${id}`);
  }
  state.job = job;
  renderStatus(job);
  $("gen-submit").disabled = false;
  $("gen-cancel").disabled = true;
  if (job.images.length) {
    state.lastSeed = job.images[0].seed;
    $("gen-seed-reuse").disabled = false;
  }
  $("gen-results").replaceChildren(...(await Promise.all(job.images.map((im) => resultCard(job, im)))));
  $("gen-params").replaceChildren(el("h3", {}, "Parameters"), params(shownRequest(job), ["webhook"]),
    el("h3", {}, "Timings (s)"), params(job.timings));
}

async function resultCard(job, im) {
  const src = await api.blobUrl(apiPath(im.url));
  const ext = job.request.output_format || "png";
  return el("figure", { class: "result" },
    el("img", { src, alt: `${job.request.prompt} (seed ${im.seed})`, width: im.width, height: im.height }),
    el("figcaption", {}, `seed ${im.seed} · ${im.width}×${im.height}`),
    el("div", { class: "actions" },
      downloadLink(src, `${job.id}-${im.index}.${ext}`),
      el("button", { type: "button", on: { click: () => { $("gen-seed").value = im.seed; $("gen-seed").focus(); } } },
        "Reuse seed"),
      el("button", { type: "button", class: "send-img2img", on: { click: () => sendToImg2img(src, job, im) } },
        "Send to image-to-image")));
}

async function sendToImg2img(src, job, im) {
  setInitImage({ src, job, im, data: null });
  const data = await dataUrl(await (await fetch(src)).blob());
  if (state.initImage && state.initImage.src === src) {
    state.initImage.data = data;
    $("gen-img2img").dataset.ready = "1";
  }
  $("gen-width").value = im.width; $("gen-height").value = im.height;
  $("gen-width").dispatchEvent(new Event("input"));
}

function setInitImage(init) {
  state.initImage = init;
  $("gen-img2img").dataset.ready = init && init.data ? "1" : "";
  $("gen-img2img").hidden = !init;
  $("gen-init-preview").src = init ? init.src : "";
  if (init) { $("gen-edit").open = true; $("gen-img2img").scrollIntoView({ block: "nearest" }); }
}

async function cancel() {
  if (!state.job) return;
  try {
    renderStatus(await api.post(`/v1/images/${state.job.id}/cancel`));
  } catch (e) {
    showError($("gen-error"), e);
  }
}

export function showGenerate() {
  return Promise.all([loadModels(), loadAdapters()]);
}

// ---- Gallery ---------------------------------------------------------------------------------------------
const gallery = { cursors: [null], next: null, pageSize: 12 };

/** One page of image jobs. The API filters by status; the model filter is applied to what it returns, reading
 *  further pages (at most 5 requests) until the page is full. */
export async function showGallery() {
  await loadModels();
  const status = $("gal-status").value, model = $("gal-model").value;
  let after = gallery.cursors[gallery.cursors.length - 1];
  const rows = [];
  let more = true;
  for (let i = 0; i < 5 && more && rows.length < gallery.pageSize; i++) {
    const q = new URLSearchParams({ limit: String(gallery.pageSize) });
    if (after) q.set("after", after);
    if (status) q.set("status", status);
    const page = await api.get(`/v1/images?${q}`);
    for (const job of page.data) {
      after = job.id;
      if (!model || job.model.id === model) rows.push(job);
      if (rows.length === gallery.pageSize) break;
    }
    more = page.has_more || rows.length === gallery.pageSize;
  }
  gallery.next = after;
  $("gal-older").disabled = !more;
  $("gal-newer").disabled = gallery.cursors.length < 2;
  const list = $("gal-list");
  list.replaceChildren(...rows.map(galleryCard));
  if (!rows.length) list.append(el("p", { class: "muted" }, "No image jobs match."));
  list.dataset.shown = `${status}|${model}`; // the filter the cards answer (tests wait on it)
  for (const job of rows) loadThumb(job);
}

function galleryCard(job) {
  const r = job.request;
  return el("article", { class: "card", dataset: { jobId: job.id } },
    el("div", { class: "thumbs", id: `thumb-${job.id}` }),
    el("p", { class: "prompt" }, r.prompt),
    el("p", {}, badge(job.status), ` ${job.model.name || job.model.id || "default model"} · ${ago(job.created_at)}`),
    el("p", { class: "muted" }, `${r.width}×${r.height} · ${r.steps} steps · CFG ${r.guidance_scale} · ${r.sampler}`
      + ` · seed ${r.seed} · n ${r.n}`),
    job.adapters?.length ? el("p", { class: "adapters-used" }, `adapters: ${adapterText(job.adapters)}`) : null,
    el("details", {}, el("summary", {}, "Parameters"), params(shownRequest(job), ["webhook"])),
    el("button", { type: "button", class: "again", on: { click: () => again(job) } }, "Generate again"));
}

async function loadThumb(job) {
  const box = $(`thumb-${job.id}`);
  for (const im of job.images) {
    const src = await api.blobUrl(apiPath(im.url)).catch(() => null);
    if (src && box) box.append(el("img", { src, alt: `image ${im.index} of ${job.id}`, class: "thumb" }));
  }
}

function again(job) {
  fillForm({ ...job.request, adapters: job.request.adapters || [] });
  location.hash = "#generate";
  $("gen-prompt").focus();
}
