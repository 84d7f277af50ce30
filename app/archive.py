"""Safe extraction of an uploaded dataset archive (``.zip``, ``.tar``, ``.tar.gz``). Pure: standard library and PIL
(via app/uploads.py), no web framework, no torch.

The whole archive is refused (``ArchiveError``, a 4xx naming the problem and the limit) for: a type other than zip /
tar / gzip-tar by magic bytes; an absolute or ``..`` path; a link, device or FIFO entry; more entries than the limit;
a total uncompressed size or a compression ratio over the limit (declared sizes checked first, actual bytes counted
while extracting, so a lying header stops at the limit too); no usable image. Single files are skipped with a reason
(the report): ``__MACOSX`` and hidden files, files that are neither an image nor a ``.txt`` caption, images that fail
app/uploads.py's checks (magic bytes, pixel limit read from the header before decoding, full decode).

Kept files are written flat into the destination folder (the path inside the archive, without a folder common to
every entry, joined by ``_``), so the trainer's scan (hdm_core/data/scan.py: top level and one folder deep) sees
every one; a caption is the image's same-stem ``.txt``."""

from __future__ import annotations

import hashlib
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

from app.uploads import UploadError, UploadLimits, load_image

Problem = Literal[
    "not_an_archive", "unsafe_path", "link_entry", "too_many_entries", "too_large", "ratio", "no_images"
]
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
CHUNK = 1 << 20
MAX_NAME_BYTES = 200  # the flat name, before the suffix and a repeat's `_rN`


class ArchiveError(ValueError):
    """A refused archive: what is wrong (`problem`) and the limit it broke."""

    def __init__(self, problem: Problem, message: str, *, limit: int | str | None = None) -> None:
        super().__init__(message)
        self.problem, self.message, self.limit = problem, message, limit

    @property
    def status(self) -> int:
        return 413 if self.problem == "too_large" else 422


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 10_000
    max_total_bytes: int = 8 * 2**30  # uncompressed, all entries together
    max_ratio: int = 200  # uncompressed / compressed, per entry (zip) or for the whole stream (tar.gz)
    max_file_bytes: int = 64 * 2**20
    image: UploadLimits = field(default_factory=lambda: UploadLimits(64 * 2**20, 64 * 1024 * 1024))


@dataclass
class Report:
    kept: list[dict[str, Any]] = field(default_factory=list)  # {"file", "from", "caption"}
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "skipped": self.skipped, "images": len(self.kept)}


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int  # declared, uncompressed
    compressed: int
    kind: Literal["file", "dir", "link", "device"]
    open: Any  # () -> readable binary stream


def _check_path(name: str) -> PurePosixPath:
    clean = name.replace("\\", "/")
    if "\x00" in clean:
        raise ArchiveError("unsafe_path", f"entry {name!r} has a NUL character in its name")
    path = PurePosixPath(clean)
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":") or path.is_absolute():
        raise ArchiveError("unsafe_path", f"entry {name!r} has an absolute path")
    if ".." in path.parts:
        raise ArchiveError("unsafe_path", f"entry {name!r} leaves the archive's folder (..)")
    return path


def _zip_entries(zf: zipfile.ZipFile) -> Iterator[_Entry]:
    for info in zf.infolist():
        mode = info.external_attr >> 16
        kind: Literal["file", "dir", "link", "device"] = "file"
        if info.is_dir():
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "link"
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # zip writers without file-type bits write 0
            kind = "device"
        yield _Entry(info.filename, info.file_size, info.compress_size, kind, lambda i=info: zf.open(i))


def _tar_entries(tf: tarfile.TarFile) -> Iterator[_Entry]:
    for member in tf:
        kind: Literal["file", "dir", "link", "device"] = "file"
        if member.isdir():
            kind = "dir"
        elif member.issym() or member.islnk():
            kind = "link"
        elif not member.isfile():
            kind = "device"
        yield _Entry(member.name, member.size, member.size, kind, lambda m=member: tf.extractfile(m))


def _open(path: Path) -> tuple[Any, Iterator[_Entry]]:
    with path.open("rb") as fh:
        head = fh.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise ArchiveError("not_an_archive", f"not a readable zip: {exc}") from None
        return zf, _zip_entries(zf)
    if head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        try:
            tf = tarfile.open(path, "r:gz" if head[:2] == b"\x1f\x8b" else "r:")  # noqa: SIM115 (closed by extract)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError("not_an_archive", f"not a readable tar archive: {exc}") from None
        return tf, _tar_entries(tf)
    raise ArchiveError(
        "not_an_archive", "file is not a .zip, .tar or .tar.gz archive", limit="zip, tar, tar.gz"
    )


def _read(stream: IO[bytes], limit: int, budget: int) -> bytes:
    """At most `limit` bytes of an entry (ArchiveError past the total `budget` left)."""
    out = bytearray()
    while chunk := stream.read(CHUNK):
        out += chunk
        if len(out) > budget:
            raise ArchiveError("too_large", "the archive unpacks to more than the total limit", limit=budget)
        if len(out) > limit:
            break
    return bytes(out)


def _flat_name(parts: tuple[str, ...]) -> str:
    """The parts joined by `_`; a name too long for a file system (255 bytes) is cut and given a hash."""
    name = "_".join(parts)
    if len(name.encode()) > MAX_NAME_BYTES:
        name = (
            name.encode()[:100].decode("utf-8", "ignore") + "_" + hashlib.sha1(name.encode()).hexdigest()[:12]
        )
    return name


def extract(archive: Path, dest: Path, limits: ArchiveLimits = ArchiveLimits()) -> Report:
    """Check and extract `archive` into the (new, empty) folder `dest`; the caller removes `dest` on ArchiveError."""
    handle, entries = _open(archive)
    compressed_total = max(archive.stat().st_size, 1)
    report = Report()
    pending = dest / ".pending"  # validated images wait here (on disk, not in memory) for their final names
    pending.mkdir(parents=True, exist_ok=True)
    images: dict[tuple[str, ...], Path] = {}
    captions: dict[tuple[str, ...], str] = {}
    total = count = 0
    try:
        for entry in entries:
            count += 1
            if count > limits.max_entries:
                raise ArchiveError(
                    "too_many_entries", f"more than {limits.max_entries} entries", limit=limits.max_entries
                )
            path = _check_path(entry.name)
            if entry.kind == "link":
                raise ArchiveError(
                    "link_entry", f"entry {entry.name!r} is a link; archives may hold only files"
                )
            if entry.kind == "device":
                raise ArchiveError(
                    "link_entry", f"entry {entry.name!r} is a device or FIFO; only files allowed"
                )
            if entry.kind == "dir":
                continue
            total += entry.size
            if total > limits.max_total_bytes:
                raise ArchiveError(
                    "too_large",
                    "the archive unpacks to more than the total limit",
                    limit=limits.max_total_bytes,
                )
            if entry.compressed and entry.size / entry.compressed > limits.max_ratio and entry.size > CHUNK:
                raise ArchiveError(
                    "ratio",
                    f"entry {entry.name!r} is compressed over {limits.max_ratio}:1",
                    limit=limits.max_ratio,
                )
            if total > 64 * CHUNK and total / compressed_total > limits.max_ratio:
                raise ArchiveError(
                    "ratio", f"the archive is compressed over {limits.max_ratio}:1", limit=limits.max_ratio
                )
            if "__MACOSX" in path.parts or any(p.startswith(".") for p in path.parts):
                report.skipped.append({"file": entry.name, "reason": "hidden or __MACOSX file"})
                continue
            suffix = path.suffix.lower()
            if suffix not in IMAGE_SUFFIXES and suffix != ".txt":
                report.skipped.append({"file": entry.name, "reason": "neither an image nor a .txt caption"})
                continue
            if entry.size > limits.max_file_bytes:
                report.skipped.append({"file": entry.name, "reason": f"over {limits.max_file_bytes} bytes"})
                continue
            with entry.open() as stream:
                data = _read(stream, limits.max_file_bytes, limits.max_total_bytes - total + entry.size)
            if len(data) > limits.max_file_bytes:
                report.skipped.append({"file": entry.name, "reason": f"over {limits.max_file_bytes} bytes"})
                continue
            key = path.with_suffix("").parts
            if suffix == ".txt":
                captions[key] = data.decode("utf-8", "replace").strip()
                continue
            try:
                load_image(data, "image", limits.image)
            except UploadError as exc:
                report.skipped.append({"file": entry.name, "reason": exc.message})
                continue
            target = pending / f"{len(images)}{suffix}"
            target.write_bytes(data)
            images[(*key, suffix)] = target
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError("not_an_archive", f"the archive is damaged: {exc}") from None
    finally:
        handle.close()
    if not images:
        raise ArchiveError("no_images", "the archive holds no usable PNG, JPEG or WebP image")
    _write(images, captions, dest, report)
    pending.rmdir()
    return report


def _write(
    images: dict[tuple[str, ...], Path], captions: dict[tuple[str, ...], str], dest: Path, report: Report
) -> None:
    keys = list(images)
    tops = {k[0] for k in keys if len(k) > 2}
    strip = 1 if len(tops) == 1 and all(len(k) > 2 for k in keys) else 0
    used: set[str] = set()
    for key in sorted(keys):
        stem_parts, suffix = key[:-1], key[-1]
        stem = _flat_name(stem_parts[strip:])
        while stem.lower() in used:
            stem += "_"
        used.add(stem.lower())
        images[key].replace(dest / f"{stem}{suffix}")
        caption = captions.get(stem_parts)
        if caption is not None:
            (dest / f"{stem}.txt").write_text(caption, encoding="utf-8")
        report.kept.append(
            {"file": f"{stem}{suffix}", "from": "/".join(stem_parts) + suffix, "caption": caption}
        )
    for key in captions:
        if not any(k[:-1] == key for k in keys):
            report.skipped.append({"file": "/".join(key) + ".txt", "reason": "caption without an image"})
