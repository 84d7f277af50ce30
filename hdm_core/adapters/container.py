"""safetensors files read and rewritten without torch (the API process imports no torch).

The format (safetensors' own docs): an 8-byte little-endian header length, a JSON header (per tensor dtype, shape,
data_offsets into the byte buffer that follows, plus `__metadata__`), then the buffer. Renaming tensors only
rewrites the header; the buffer is copied through unchanged, chunk by chunk.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import atomic_write
from .errors import AdapterError

MAX_HEADER = 100_000_000
_SCALAR = {"F32": ("<f", 4), "F16": ("<e", 2), "F64": ("<d", 8)}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
_DTYPE_BYTES |= {"BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Container:
    """A parsed safetensors file: tensor entries, metadata and where the buffer starts."""

    path: Path
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    data_start: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.tensors.items()}

    def scalar(self, key: str) -> float:
        """The value of a one-element tensor (an `alpha`)."""
        entry = self.tensors[key]
        begin, end = entry["data_offsets"]
        if math.prod(entry["shape"]) != 1:
            raise AdapterError(f"{key} should hold one number, has shape {entry['shape']}")
        with self.path.open("rb") as fh:
            fh.seek(self.data_start + begin)
            raw = fh.read(end - begin)
        if entry["dtype"] == "BF16":
            return float(struct.unpack("<f", b"\x00\x00" + raw[:2])[0])
        if entry["dtype"] not in _SCALAR:
            raise AdapterError(f"{key}: dtype {entry['dtype']} is not a float")
        fmt, size = _SCALAR[entry["dtype"]]
        return float(struct.unpack(fmt, raw[:size])[0])


def read(path: str | Path) -> Container:
    """Parse and check a safetensors header: every entry's dtype, shape and offsets consistent with the file."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER or n + 8 > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"not a readable safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterError("not a readable safetensors file: the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    buffer = size - 8 - n
    for key, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            want = math.prod(entry["shape"]) * _DTYPE_BYTES[entry["dtype"]]
            ok = 0 <= begin <= end <= buffer and end - begin == want
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise AdapterError(f"not a readable safetensors file: tensor {key!r} has a bad entry {entry!r}")
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    if any(a[1] != b[0] for a, b in zip([(0, 0), *spans], spans, strict=False)):
        raise AdapterError("not a readable safetensors file: tensor data overlaps or leaves gaps")
    return Container(path, header, {str(k): str(v) for k, v in meta.items()}, 8 + n)


def rewrite(
    src: Container,
    dst: Path,
    rename: Mapping[str, str],
    metadata: Mapping[str, str],
    add_scalars: Mapping[str, float] | None = None,
) -> None:
    """Write `src` to `dst` (atomically) with tensors renamed, F32 scalars appended and the given metadata."""
    entries = {rename[k]: dict(v) for k, v in src.tensors.items()}
    end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    extra = b""
    for key, value in (add_scalars or {}).items():
        entries[key] = {"dtype": "F32", "shape": [], "data_offsets": [end + len(extra), end + len(extra) + 4]}
        extra += struct.pack("<f", value)
    header = json.dumps({"__metadata__": dict(metadata), **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)

    def write(tmp: Path) -> None:
        with src.path.open("rb") as fin, tmp.open("wb") as fout:
            fout.write(struct.pack("<Q", len(header)) + header)
            fin.seek(src.data_start)
            remaining = end
            while remaining > 0:
                chunk = fin.read(min(remaining, 1 << 20))
                if not chunk:
                    raise AdapterError(f"{src.path.name} ends inside its tensor data")
                fout.write(chunk)
                remaining -= len(chunk)
            fout.write(extra)
            fout.flush()
            os.fsync(fout.fileno())

    atomic_write(dst, write)


def model_weight_shapes(ckpt: Container) -> dict[str, tuple[int, ...]]:
    """XUT module path -> weight shape from a checkpoint's header (`unet.model.` as written by
    `hdm_core.checkpoint.save_checkpoint`, `model.` or bare keys; VAE tensors left out)."""
    names = [k for k in ckpt.tensors if not k.startswith("vae")]
    for prefix in ("unet.model.", "model.", ""):
        found = {
            k[len(prefix) : -len(".weight")]: tuple(ckpt.tensors[k]["shape"])
            for k in names
            if k.startswith(prefix) and k.endswith(".weight")
        }
        if found:
            return found
    raise AdapterError(f"{ckpt.path.name} holds no XUT weights")
