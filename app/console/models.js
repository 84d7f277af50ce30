// Models (GET /v1/models: default and shared flags, make default, import, download, delete with the API's
// confirm_outside step) and Adapters (GET /v1/adapters: generate with this, download, delete, merge into a model).
import { addAdapter } from "./adapters.js";
import { api } from "./api.js";
import { $, ago, badge, bytes, el, showError } from "./dom.js";
import { fillForm } from "./generate.js";

const FINAL = ["succeeded", "failed", "cancelled"];
// notAdminKey: the key the service answered admin_required for; admin-only buttons are hidden while it is in use
// (the API has no "who am I"; the refusal is its own answer).
const state = { models: [], adapters: [], notAdminKey: null };

export function initModels() {
  $("import-form").addEventListener("submit", importModel);
  $("merge-form").addEventListener("submit", merge);
  $("merge-adapter").addEventListener("change", selectBase);
}

/** The merge form proposes the adapter's own base model. */
function selectBase() {
  const base = baseOf(state.adapters.find((a) => a.id === $("merge-adapter").value) || {});
  if (base) $("merge-model").value = base.id;
}

export async function showModels() {
  const [models, adapters] = await Promise.all([api.get("/v1/models?limit=100"), api.get("/v1/adapters?limit=100")]);
  state.models = models.data;
  state.adapters = adapters.data;
  renderModels();
  renderAdapters();
  fillMergeForm();
}

/** Runs an API call for the Models page; a 403 admin_required marks the key as not an admin key. */
async function attempt(fn, errNode = $("models-error")) {
  showError(errNode, null);
  try {
    return await fn();
  } catch (e) {
    if (e.code === "admin_required" && state.notAdminKey !== api.key) {
      state.notAdminKey = api.key;
      renderModels();
      e.message = `${e.message} This key is not one: the admin-only buttons are hidden now.`;
    }
    showError(errNode, e);
    return null;
  }
}

function flags(m) {
  return [m.default ? el("span", { class: "flag default", title: "Requests without a model use it" }, "default") : null,
    el("span", { class: `flag ${m.shared ? "shared" : "own"}` }, m.shared ? "shared" : "yours")];
}

function renderModels() {
  const admin = state.notAdminKey !== api.key;
  $("import-box").hidden = !admin;
  $("models-admin-note").classList.toggle("error", !admin);
  $("models-list").replaceChildren(...state.models.map((m) => el("tr", { dataset: { id: m.id, default: m.default ? "1" : "" } },
    el("td", {}, el("span", { class: "name" }, m.name), " ", ...flags(m)), el("td", { class: "col-id" }, el("code", {}, m.id)),
    el("td", {}, m.params ? `${(m.params / 1e6).toFixed(2)} M` : "–"),
    el("td", {}, m.source === "train_job" ? el("a", { href: `#training/${m.train_job}` }, m.train_job) : m.source),
    el("td", {}, m.step ?? "–"), el("td", {}, bytes(m.size_bytes)), el("td", {}, ago(m.created_at)),
    el("td", {}, el("div", { class: "actions" },
      el("button", { type: "button", on: { click: () => { fillForm({ model: m.id }); location.hash = "#generate"; } } },
        "Generate with this"),
      admin && !m.default ? el("button", { type: "button", class: "make-default", on: { click: () => makeDefault(m) } },
        "Make default") : null,
      el("button", { type: "button", on: { click: () => download(`/v1/models/${encodeURIComponent(m.id)}/file`, m.name) } },
        "Download"),
      el("button", { type: "button", class: "danger delete", on: { click: () => deleteModel(m) } }, "Delete"))))));
  if (!state.models.length) $("models-list").append(el("tr", {}, el("td", { colspan: "8" }, "No models registered.")));
}

async function makeDefault(m) {
  if (await attempt(() => api.post(`/v1/models/${encodeURIComponent(m.id)}/default`))) await showModels();
}

async function importModel(ev) {
  ev.preventDefault();
  const body = { path: $("import-path").value.trim() };
  if ($("import-name").value.trim()) body.name = $("import-name").value.trim();
  if (await attempt(() => api.post("/v1/models/import", body))) {
    $("import-form").reset();
    await showModels();
  }
}

async function download(path, name) {
  await attempt(async () => {
    const url = await api.blobUrl(path);
    const a = el("a", { href: url, download: `${name}.safetensors` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    return true;
  });
}

/** DELETE, and when the API answers confirm_required (the file is outside the service's folders) ask again with
 *  its message before repeating with confirm_outside=true. */
async function deleteModel(m) {
  if (!confirm(`Delete model ${m.name} (${m.id}) and its file?`)) return;
  const path = `/v1/models/${encodeURIComponent(m.id)}`;
  showError($("models-error"), null);
  try {
    await api.del(path);
  } catch (e) {
    if (e.code !== "confirm_required") return attempt(() => Promise.reject(e));
    if (!confirm(e.message)) return;
    if (!(await attempt(() => api.del(`${path}?confirm_outside=true`)))) return;
  }
  await showModels();
}

// ---- Adapters ----------------------------------------------------------------------------------------------
function renderAdapters() {
  $("adapters-list").replaceChildren(...state.adapters.map((a) => el("tr", { dataset: { id: a.id } },
    el("td", {}, a.name), el("td", { class: "col-id" }, el("code", {}, a.id)), el("td", {}, a.algorithm),
    el("td", {}, a.base_model?.name || "–"), el("td", {}, a.steps ?? "–"),
    el("td", {}, a.train_job ? el("a", { href: `#training/${a.train_job}` }, a.train_job) : a.source),
    el("td", {}, bytes(a.size_bytes)),
    el("td", {}, el("div", { class: "actions" },
      el("button", { type: "button", class: "gen-with", on: { click: () => generateWith(a) } }, "Generate with this"),
      el("button", { type: "button", class: "merge", on: { click: () => {
        $("merge-adapter").value = a.id;
        selectBase();
        $("merge-adapter").focus();
      } } }, "Merge…"),
      el("button", { type: "button", on: { click: () => download(`/v1/adapters/${encodeURIComponent(a.id)}/file`, a.name) } },
        "Download"),
      el("button", { type: "button", class: "danger", on: { click: () => deleteAdapter(a) } }, "Delete"))))));
  if (!state.adapters.length) {
    $("adapters-list").append(el("tr", {}, el("td", { colspan: "8" },
      "No adapters: train one (Training, preset Adapter) or run hdm adapters import FILE on the server.")));
  }
}

/** The model the adapter was trained on, when it is registered (same file hash, else same name). */
function baseOf(a) {
  const b = a.base_model || {};
  return state.models.find((m) => b.sha256 && m.sha256 === b.sha256) || state.models.find((m) => m.name === b.name);
}

function generateWith(a) {
  const base = baseOf(a);
  if (base) fillForm({ model: base.id });
  addAdapter(a, 1);
  location.hash = "#generate";
}

async function deleteAdapter(a) {
  if (!confirm(`Unregister adapter ${a.name} (${a.id})?`)) return;
  if (await attempt(() => api.del(`/v1/adapters/${encodeURIComponent(a.id)}`))) await showModels();
}

function fillMergeForm() {
  const fill = (sel, rows, text) => {
    const keep = sel.value;
    sel.replaceChildren(...rows.map((r) => el("option", { value: r.id }, text(r))));
    if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
    return keep && sel.value === keep;
  };
  fill($("merge-adapter"), state.adapters, (a) => a.name);
  if (!fill($("merge-model"), state.models, (m) => m.name)) selectBase();
  $("merge-submit").disabled = !state.adapters.length || !state.models.length;
}

/** Queues a merge job and follows it (GET /v1/merge-jobs/{id}) until the new model is registered. */
async function merge(ev) {
  ev.preventDefault();
  const body = { adapters: [{ id: $("merge-adapter").value, weight: Number($("merge-weight").value) }] };
  if ($("merge-name").value.trim()) body.name = $("merge-name").value.trim();
  const model = $("merge-model").value;
  $("merge-submit").disabled = true;
  let job = await attempt(() => api.post(`/v1/models/${encodeURIComponent(model)}/merge`, body), $("merge-error"));
  const status = $("merge-status");
  for (let i = 0; job && !FINAL.includes(job.status) && i < 1200; i++) {
    status.replaceChildren(badge(job.status), ` merge job ${job.id}`);
    await new Promise((r) => setTimeout(r, 500));
    job = await attempt(() => api.get(`/v1/merge-jobs/${job.id}`), $("merge-error"));
  }
  $("merge-submit").disabled = false;
  if (!job) return;
  status.replaceChildren(badge(job.status), ` merge job ${job.id}`, job.model ? ` → model ${job.model}` : "");
  status.dataset.status = job.status;
  if (job.error) showError($("merge-error"), job.error);
  await showModels();
  const row = job.model && document.querySelector(`#models-list tr[data-id="${job.model}"]`);
  if (row) { row.classList.add("new"); row.scrollIntoView({ block: "nearest" }); }
}
