// The Generate page's adapters picker: adapters from GET /v1/adapters, each with a weight, sent as
// `adapters: [{id, weight}]` on POST /v1/images (at most 8, weights in [-4, 4]; the server checks both again).
import { api } from "./api.js";
import { $, el } from "./dom.js";

const MAX = 8;
const picker = { list: [] };

export function initAdapters() {
  $("gen-adapter-add").addEventListener("click", () => {
    const a = picker.list.find((x) => x.id === $("gen-adapter-pick").value);
    if (a) addAdapter(a, 1);
  });
}

/** The adapters this key may use, for the picker (called when the Generate page is shown). */
export async function loadAdapters() {
  const list = await api.get("/v1/adapters?limit=100");
  picker.list = list.data;
  refreshPick();
  return list.data;
}

function refreshPick() {
  const used = new Set(rows().map((r) => r.dataset.id));
  const sel = $("gen-adapter-pick"), keep = sel.value;
  const free = picker.list.filter((a) => !used.has(a.id));
  sel.replaceChildren(...free.map((a) => el("option", { value: a.id },
    `${a.name} (${a.algorithm}${a.base_model?.name ? `, for ${a.base_model.name}` : ""})`)));
  if (!picker.list.length) sel.append(el("option", { value: "" }, "no adapters registered"));
  else if (!free.length) sel.append(el("option", { value: "" }, "all adapters added"));
  if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  const full = rows().length >= MAX;
  $("gen-adapter-add").disabled = full || !free.length;
  sel.disabled = !free.length;
}

function rows() {
  return [...$("gen-adapter-rows").children];
}

/** Adds `a` ({id, name}) to the request at `weight`, or sets the weight of the row it already has. */
export function addAdapter(a, weight = 1) {
  const have = rows().find((r) => r.dataset.id === a.id);
  if (have) {
    have.querySelector("input").value = weight;
    return;
  }
  if (rows().length >= MAX) return;
  const n = `gen-adapter-w-${a.id}`;
  const row = el("li", { class: "adapter-row", dataset: { id: a.id, name: a.name || a.id } },
    el("label", { for: n }, `Weight of ${a.name || a.id}`),
    el("input", { id: n, type: "number", min: "-4", max: "4", step: "0.05", value: String(weight) }),
    el("button", { type: "button", "aria-label": `Remove adapter ${a.name || a.id}`,
      on: { click: () => { row.remove(); refreshPick(); $("gen-adapter-pick").focus(); } } }, "Remove"));
  $("gen-adapter-rows").append(row);
  refreshPick();
}

/** Replaces the picked adapters (a job's `request.adapters`, or [] for none). */
export function setAdapters(list) {
  $("gen-adapter-rows").replaceChildren();
  for (const a of list || []) addAdapter(a, a.weight ?? 1);
  refreshPick();
}

/** `adapters` for the request body, or undefined when none is picked (the body stays what a script sends). */
export function readAdapters() {
  const picked = rows().map((r) => ({ id: r.dataset.id, weight: Number(r.querySelector("input").value) }));
  return picked.length ? picked : undefined;
}

/** A job's adapters ([{name, weight}]) as people write them: "style-a × 0.8, other × -1". */
export function adapterText(list) {
  return (list || []).map((a) => `${a.name || a.id} × ${a.weight}`).join(", ");
}
