"""Load and save XUT checkpoints in the released single-file layout (spec §9), inferring the architecture."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .codec import Codec, PixelCodec, VaeCodec
from .config import XUTConfig
from .files import atomic_write
from .model import XUT
from .samplers.schedules import schedule_file

MODEL_PREFIX = "unet.model."
FORMAT = "hdm-serve/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not describe an XUT."""


@dataclass
class LoadedCheckpoint:
    model: XUT
    codec: Codec | None
    config: XUTConfig
    metadata: dict[str, str] = field(default_factory=dict)


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors")) or sorted(path.glob("transformer/*.safetensors"))
        if not candidates:
            raise CheckpointError(f"{path} is a folder without .safetensors files")
        sd: dict[str, Tensor] = {}
        meta: dict[str, str] = {}
        for file in candidates:
            part, part_meta = _read_tensors(file)
            sd.update(part)
            meta.update(part_meta)
        return sd, meta
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix in {".ckpt", ".pt", ".pth"}:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt pickles/zips
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} holds no state_dict")
        return {k: v for k, v in sd.items() if isinstance(v, Tensor)}, {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc


def _split(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Model tensors without prefix (released `unet.model.`, diffusers `model.`, or bare) and `vae.*` tensors."""
    for prefix in (MODEL_PREFIX, "model.", ""):
        model = {
            k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and not k.startswith("vae")
        }
        if "in_patch.proj.weight" in model:
            return model, {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    raise CheckpointError("no XUT weights found: expected keys like 'unet.model.in_patch.proj.weight'")


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    return len({m[1] for k in sd if (m := re.match(pattern, k))})


def infer_config(sd: dict[str, Tensor], metadata: dict[str, str] | None = None) -> XUTConfig:
    """Architecture from tensor names and shapes; non-shape fields (ctx_size, TREAD rate, skip source) come from
    the metadata when it has them, else the released model's values."""
    metadata = metadata or {}
    if "hdm_config" in metadata:
        base = XUTConfig.from_dict(json.loads(metadata["hdm_config"]))
    elif "arch" in metadata:
        base = XUTConfig.from_reference_arch(json.loads(metadata["arch"]))
    else:
        base = XUTConfig()
    try:
        dim, in_ch, patch, _ = sd["in_patch.proj.weight"].shape
        rope = next(v for k, v in sd.items() if k.endswith("attn.rope.freqs"))
        mlp = next(v for k, v in sd.items() if k.endswith("mlp.w3.weight"))
        addon = sd.get("addon_info_embs_proj.0.weight")
        return base.replace(
            patch_size=int(patch),
            in_channels=int(in_ch),
            dim=int(dim),
            ctx_dim=int(sd["ctx_proj.weight"].shape[1]),
            heads=int(rope.shape[0]),
            head_dim=int(rope.shape[1]) * 4,
            mlp_dim=int(mlp.shape[1]),
            depth=_count(sd, r"backbone\.enc_blocks\.(\d+)\."),
            enc_blocks=_count(sd, r"backbone\.enc_blocks\.0\.(\d+)\."),
            dec_blocks=_count(sd, r"backbone\.dec_blocks\.0\.(\d+)\."),
            tread_pre=_count(sd, r"prev_tread_trns\.blocks\.(\d+)\."),
            tread_post=_count(sd, r"post_tread_trns\.blocks\.(\d+)\."),
            addon_dim=int(addon.shape[1]) if addon is not None else 0,
        )
    except (KeyError, StopIteration, ValueError) as exc:
        raise CheckpointError(f"cannot infer the XUT architecture from the tensors: {exc}") from exc


def _check_keys(model: XUT, sd: dict[str, Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = [
        f"{k}: file {list(sd[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{len(items)} {label} key(s): {', '.join(items[:10])}{more}")
        raise CheckpointError("checkpoint does not match the inferred XUT architecture; " + "; ".join(parts))


def _load_codec(vae_sd: dict[str, Tensor], sd: dict[str, Tensor], metadata: dict[str, str]) -> Codec | None:
    if vae_sd:
        if "vae_mean" not in sd or "vae_std" not in sd:
            raise CheckpointError("checkpoint has vae.* weights but no vae_mean / vae_std")
        config = json.loads(metadata["vae_config"]) if "vae_config" in metadata else None
        try:
            return VaeCodec.from_state_dict(vae_sd, sd["vae_mean"], sd["vae_std"], config)
        except (ValueError, RuntimeError) as exc:
            raise CheckpointError(f"the checkpoint's VAE weights cannot be loaded: {exc}") from exc
    if metadata.get("hdm_codec") == "pixel":
        return PixelCodec()
    return None


def load_checkpoint(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    load_codec: bool = True,
) -> LoadedCheckpoint:
    """Read a released HDM file, a file written by `save_checkpoint`, a Lightning `.ckpt`, or a diffusers-style
    folder; build the XUT it describes in `dtype` on `device` (eval mode), plus its codec if it carries one."""
    path = Path(path)
    sd, metadata = _read_tensors(path)
    model_sd, vae_sd = _split(sd)
    config = infer_config(model_sd, metadata)
    with torch.device("meta"):
        model = XUT(config)
    _check_keys(model, model_sd)
    model.load_state_dict(model_sd, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    codec = _load_codec(vae_sd, sd, metadata) if load_codec else None
    if codec is not None:
        codec = codec.to(device)
    return LoadedCheckpoint(model=model, codec=codec, config=config, metadata=metadata)


# Metadata key: the caption length (tokens) a model was trained with. Models trained here always saw captions padded
# to it (spec §4), so inference pads to it too; released weights lack it and keep the reference's padding.
TEXT_LENGTH_KEY = "hdm_text_max_length"


def trained_text_length(metadata: dict[str, str]) -> int | None:
    """The training caption length recorded in a checkpoint's metadata, or None."""
    raw = metadata.get(TEXT_LENGTH_KEY)
    try:
        value = int(raw) if raw is not None else None
    except ValueError:
        raise CheckpointError(f"metadata {TEXT_LENGTH_KEY}={raw!r} is not an integer") from None
    return value if value is not None and value > 0 else None


def atomic_save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_checkpoint(
    path: str | Path,
    model: XUT,
    *,
    codec: Codec | None = None,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `unet.model.*` (+ `vae.*`, `vae_mean`, `vae_std` for a VAE codec) with the config in the metadata."""
    path = Path(path)
    model = model.module if hasattr(model, "module") else model  # DDP / compiled wrappers
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        tensors[MODEL_PREFIX + key] = (value.to(dtype) if dtype is not None else value).contiguous()
    meta = {
        "format": FORMAT,
        "hdm_config": json.dumps(model.config.to_dict()),
        "hdm_codec": codec.kind if codec is not None else "none",
    }
    if isinstance(codec, VaeCodec):
        tensors.update({k: v.detach().to("cpu").contiguous() for k, v in codec.checkpoint_tensors().items()})
        meta["vae_config"] = codec.config_json()
    meta.update(metadata or {})
    atomic_save_file(tensors, path, meta)
    # A tuned schedule beside the file was searched for the weights just replaced (hdm_core.samplers.tuning).
    schedule_file(path).unlink(missing_ok=True)
    return path
