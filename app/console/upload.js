// Datasets page: upload a .zip / .tar / .tar.gz (drag and drop or the file picker) as POST /v1/datasets multipart,
// then show the server's report: every kept image with a thumbnail and its caption, every skipped file and why.
import { api } from "./api.js";
import { $, el, showError } from "./dom.js";

const THUMBS = 48; // thumbnails fetched per report (each one is an authorised GET)

let picked = null;

function pick(file) {
  picked = file || null;
  $("ds-file-name").textContent = picked ? `${picked.name} (${Math.ceil(picked.size / 1024)} KiB)` : "no file chosen";
}

async function thumb(dsId, item) {
  const img = el("img", { alt: item.file, width: "64", height: "64", loading: "lazy" });
  api.blobUrl(`/v1/datasets/${dsId}/images/${encodeURIComponent(item.file)}`)
    .then((url) => { img.src = url; img.dataset.loaded = "1"; })
    .catch(() => { img.alt = `${item.file} (not loaded)`; });
  return el("figure", { class: "thumb" }, img, el("figcaption", {}, item.caption || "(no caption)"));
}

async function showReport(ds) {
  const up = ds.upload;
  const figures = await Promise.all(up.kept.slice(0, THUMBS).map((k) => thumb(ds.id, k)));
  $("ds-report").replaceChildren(
    el("h3", {}, `${ds.name}: ${up.images} images kept, ${up.skipped.length} skipped`),
    el("div", { class: "thumbs", id: "ds-thumbs" }, ...figures),
    up.skipped.length
      ? el("table", { class: "list", id: "ds-skipped" }, el("caption", {}, "Skipped"),
        el("thead", {}, el("tr", {}, el("th", {}, "file"), el("th", {}, "why"))),
        el("tbody", {}, ...up.skipped.map((s) => el("tr", {}, el("td", {}, s.file), el("td", {}, s.reason)))))
      : el("p", { class: "muted" }, "Nothing skipped."));
  $("ds-report").hidden = false;
  $("ds-report").dataset.dataset = ds.id;
}

async function submitUpload(ev, refresh) {
  ev.preventDefault();
  showError($("ds-up-error"), null);
  if (!picked) {
    showError($("ds-up-error"), new Error("Choose or drop a .zip, .tar or .tar.gz first."));
    return;
  }
  const form = new FormData();
  form.append("file", picked, picked.name);
  form.append("name", $("ds-up-name").value || picked.name.replace(/\.(zip|tar|tar\.gz|tgz)$/i, ""));
  if ($("ds-trigger").value) form.append("trigger_word", $("ds-trigger").value);
  form.append("repeats", $("ds-repeats").value || "1");
  $("ds-up-submit").disabled = true;
  try {
    const ds = await api.upload("/v1/datasets", form);
    await showReport(ds);
    $("ds-upload").reset();
    pick(null);
    await refresh();
  } catch (e) {
    showError($("ds-up-error"), e);
  } finally {
    $("ds-up-submit").disabled = false;
  }
}

export function initUpload(refresh) {
  const zone = $("ds-drop");
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    pick(ev.dataTransfer.files[0]);
  });
  $("ds-file").addEventListener("change", () => pick($("ds-file").files[0]));
  $("ds-upload").addEventListener("submit", (ev) => submitUpload(ev, refresh));
  pick(null);
}
