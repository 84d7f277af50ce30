"""`.pt` / `.ckpt` adapter files (what `torch.save` writes) turned into a bare safetensors file.

Read only with `torch.load(weights_only=True)`: torch's restricted unpickler builds tensors and plain containers
and refuses any other global, so a pickle that would run code is refused before anything of it runs (torch's docs,
"torch.load ... weights_only"). The API runs this as its own process (`python -m hdm_core.adapters.pickled SRC
DST`), so the API process itself never imports torch."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import AdapterError

# the process's exit status when the file is refused (its message on stderr); any other failure is a crash
REFUSED = 3


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors (a flat dict of tensors, or one under `state_dict`)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(f"refused by torch.load(weights_only=True): {first}") from None
    if isinstance(obj, dict) and set(obj) == {"state_dict"}:
        obj = obj["state_dict"]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise AdapterError(
            "holds no flat dict of named tensors (what torch.save(network.state_dict()) writes)"
        )
    return obj


def to_safetensors(src: str | Path, dst: str | Path) -> None:
    tensors = load_tensors(src)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(dst))


def main(argv: list[str]) -> int:
    try:
        to_safetensors(argv[0], argv[1])
    except AdapterError as exc:
        sys.stderr.write(f"{exc}\n")
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
