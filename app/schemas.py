"""Request schemas (pydantic v2) with limits and examples: what the API accepts (responses: app/responses.py)."""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    UrlConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hdm_core.config import DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_SEED, SCHEDULE_NAMES, check_seed
from hdm_core.train.config import (
    ADAPTER_TARGETS,
    AdapterSection,
    CacheSection,
    ObjectiveSection,
    SamplingSection,
    StageSection,
    TextEncoderSection,
    TrainSection,
)


def _no_nul(v: str) -> str:
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    return v


Text = Annotated[str, AfterValidator(_no_nul)]


def _url(v: AnyHttpUrl) -> str:
    return str(v)


_HttpUrl = Annotated[AnyHttpUrl, UrlConstraints(max_length=2000), AfterValidator(_url)]
WebhookUrl = Annotated[
    _HttpUrl | None,
    Field(None, description="Called with the job object (signed) when the job reaches a final status."),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Camera(Strict):
    x_shift: float = Field(0.0, ge=-5, le=5)
    y_shift: float = Field(0.0, ge=-5, le=5)
    zoom: float = Field(1.0, ge=0.2, le=5)


class TreadGuidance(Strict):
    cond_rate: float = Field(0.0, ge=0, le=0.9)
    uncond_rate: float = Field(0.0, ge=0, le=0.9)


class AdapterRef(Strict):
    """One adapter of an image request, applied at ``weight`` (negative weights push away from what it learned)."""

    id: Text = Field(min_length=1, max_length=300, description="An adapter id or name from /v1/adapters.")
    weight: float = Field(1.0, ge=-4, le=4, description="Multiplier of the adapter's weight change; 0 = off.")


class ImageParams(Strict):
    """Fields shared by ``POST /v1/images`` and the OpenAI-compatible endpoint's extensions."""

    negative_prompt: Text = Field("", max_length=8000)
    model: Text | None = Field(None, max_length=300, description="A model id or name from /v1/models.")
    n: int = Field(1, ge=1, le=8)
    steps: int = Field(DEFAULT_STEPS, ge=1, le=200)
    guidance_scale: float = Field(3.0, ge=0, le=30, description="1 = no CFG (one pass per step).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Image i uses seed+i; null = random.")
    sampler: Text = Field(
        DEFAULT_SAMPLER,
        max_length=40,
        description="A sampler the model lists in /v1/models/{id} (docs/service.md).",
    )
    schedule: Text | None = Field(
        None,
        max_length=40,
        description="Where the steps go in t: "
        + ", ".join(SCHEDULE_NAMES)
        + "; null = the sampler's default.",
    )
    camera: Camera = Field(default_factory=Camera)
    tread_guidance: TreadGuidance = Field(default_factory=TreadGuidance)
    output_format: Literal["png", "webp", "jpeg"] = "png"
    adapters: list[AdapterRef] = Field(
        default_factory=list,
        max_length=8,
        description="Adapters applied on top of the model for this request (at most 8, weights in [-4, 4]).",
    )
    webhook: WebhookUrl = None
    # image editing (issue 13): checked and stored by app/services/edits.py before the job exists
    init_image: str | None = Field(
        None,
        description="Image-to-image / inpainting: a PNG, JPEG or WebP as base64 or a data: URL "
        "(HDM_UPLOAD_MAX_BYTES, HDM_UPLOAD_MAX_PIXELS). It is fitted to width x height (cover, centre crop).",
    )
    strength: float | None = Field(
        None,
        ge=0,
        le=1,
        description="How far the init image is noised: 0 keeps it, 1 ignores it. Default 0.8.",
    )
    mask: str | None = Field(
        None,
        description="Inpainting mask (base64 / data: URL), the init image's size: white (or transparent) = repaint. "
        "Without it, an init image with transparency uses that as the mask.",
    )
    mask_blur: float = Field(
        0.0, ge=0, le=64, description="Inward feather of the mask edge, pixels (Gaussian sigma)."
    )

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, seed: int | None, info: ValidationInfo) -> int | None:
        if seed is not None:
            check_seed(seed, info.data.get("n", 1))
        return seed


class ImageRequest(ImageParams):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a watercolor fox in a misty forest",
                    "negative_prompt": "blurry",
                    "width": 1024,
                    "height": 1024,
                    "steps": 24,
                    "guidance_scale": 3.0,
                    "seed": 42,
                    "n": 1,
                    "output_format": "png",
                }
            ]
        }
    )

    prompt: Text = Field(min_length=1, max_length=8000)
    width: int = Field(
        1024, ge=16, le=8192, description="Multiple of 16; 256..2048 by default (server setting)."
    )
    height: int = Field(
        1024, ge=16, le=8192, description="Multiple of 16; 256..2048 by default (server setting)."
    )


class OpenAIImageRequest(ImageParams):
    """OpenAI ``images.generate`` body plus the extension fields; unknown OpenAI options are ignored."""

    model_config = ConfigDict(
        extra="ignore",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dusk", "size": "1024x1024", "n": 1, "response_format": "b64_json"}
            ]
        },
    )

    prompt: Text = Field(min_length=1, max_length=8000)
    size: Text = Field("1024x1024", max_length=20, pattern=r"^\d{1,5}x\d{1,5}$", description="WxH")
    response_format: Literal["b64_json", "url"] = "b64_json"


class OpenAIEditRequest(ImageParams):
    """The text fields of OpenAI's ``images.edit`` form (the files come as parts) plus the extension fields;
    unknown OpenAI options are ignored. ``strength`` defaults to 1 with a mask (the masked area is repainted from
    noise, as OpenAI's edits do) and to 0.8 without one (image-to-image)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: Text = Field(min_length=1, max_length=8000)
    size: Text = Field("1024x1024", max_length=20, pattern=r"^\d{1,5}x\d{1,5}$", description="WxH")
    response_format: Literal["b64_json", "url"] = "b64_json"


def _core(section: type[BaseModel], name: str, *, optional: bool = True, **limits: Any) -> Any:
    """A train-config field's type and rules as hdm_core/train/config.py declares them (the one definition the
    trainer validates with); the API adds its server limits (``limits``) and defaults on top. ``optional=False`` drops a ``None``
    the trainer allows (the API always sends a value)."""
    field = section.model_fields[name]
    annotation = field.annotation
    if not optional and get_origin(annotation) in (Union, UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    # the API's limits come last: where both bound the same side, the API's (tighter) bound is the one applied
    return Annotated[annotation, *field.metadata, Field(**limits)]


class Stage(Strict):
    """A progressive-resolution stage: the trainer's [[stages]] (StageSection) with the server's limits."""

    resolution: _core(StageSection, "resolution", ge=16, le=4096) = 256  # type: ignore[valid-type]
    steps: _core(StageSection, "steps", le=10_000_000) = None  # type: ignore[valid-type]
    epochs: int | None = Field(
        None, ge=1, le=100_000, description="Whole epochs (the trainer also takes fractions)."
    )
    batch_size: _core(StageSection, "batch_size", le=4096) = 8  # type: ignore[valid-type]
    grad_accum: _core(StageSection, "grad_accum", le=1024) = 1  # type: ignore[valid-type]
    lr: _core(StageSection, "lr", le=1) = 1e-4  # type: ignore[valid-type]
    tread_rate: _core(StageSection, "tread_rate", le=0.9) = 0.5  # type: ignore[valid-type]
    grad_checkpointing: bool = Field(
        False, description="Any stage asking for it turns on [model] gradient_checkpointing."
    )
    caption_dropout: _core(StageSection, "caption_dropout", optional=False) = 0.1  # type: ignore[valid-type]
    warmup_steps: _core(StageSection, "warmup_steps", optional=False, le=10_000_000) = 0  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _one_length(self) -> Stage:
        if (self.steps is None) == (self.epochs is None):  # StageSection's rule, checked here for a 422
            raise ValueError("give exactly one of steps or epochs")
        return self


class AdapterSpec(Strict):
    """Train a LyCORIS adapter on ``base_model`` (frozen) instead of the whole model: the trainer's [adapter]
    (AdapterSection) with the server's limits; defaults = HDM's recipe (LoKr, factor 4, full matrix, norms
    trained; stages without an explicit ``lr`` get the recipe's)."""

    algorithm: _core(AdapterSection, "algorithm") = "lokr"  # type: ignore[valid-type]
    rank: _core(AdapterSection, "rank", le=1024) = 8  # type: ignore[valid-type]
    alpha: _core(AdapterSection, "alpha", le=10_000) = 4.0  # type: ignore[valid-type]
    factor: _core(AdapterSection, "factor", ge=-1, le=1024) = 4  # type: ignore[valid-type]
    full_matrix: bool = True
    train_norm: bool = True
    targets: _core(AdapterSection, "targets", max_length=64) = Field(  # type: ignore[valid-type]
        default=ADAPTER_TARGETS,
        description="fnmatch patterns over the XUT's module names; only Linear layers get an adapter.",
    )
    trigger_words: _core(AdapterSection, "trigger_words", max_length=32) = ()  # type: ignore[valid-type]
    caption_sample: Text | None = Field(
        None, max_length=2000, description="Stored in the file; default: the data set's first caption."
    )
    save_dtype: _core(AdapterSection, "save_dtype") = Field(  # type: ignore[valid-type]
        "fp16", description="Precision of the adapter files (training itself keeps fp32 weights)."
    )

    @model_validator(mode="after")
    def _section_rules(self) -> AdapterSpec:
        AdapterSection(**self.model_dump())  # the trainer's own rules (e.g. factor -1 or >= 2), as a 422 now
        return self


class TrainCache(Strict):
    """The trainer's [cache] (CacheSection): VAE latents and text-encoder states encoded once into the run's folder
    (every rank its share, docs/training.md) instead of at every step."""

    latents: _core(CacheSection, "latents") = False  # type: ignore[valid-type]
    text: _core(CacheSection, "text") = False  # type: ignore[valid-type]


class TrainRequest(Strict):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "name": "pixel-debug",
                    "base_model": None,
                    "arch": "xut-pixel-debug",
                    "dataset": "ds_0192f3a1b2c3d4e5f6a7b8",
                    "stages": [{"resolution": 64, "steps": 100, "batch_size": 4, "lr": 3e-4}],
                    "gpus": 1,
                    "precision": "fp32",
                    "text_max_length": 64,
                }
            ]
        },
    )

    name: Text = Field("", max_length=200)
    base_model: Text | None = Field(None, max_length=300)
    arch: Text | dict[str, Any] | None = Field(None, description="Preset name or architecture object.")
    dataset: Text = Field(max_length=64)
    stages: list[Stage] = Field(min_length=1, max_length=16)
    gpus: int = Field(1, ge=1, le=64)
    nodes: int = Field(1, ge=1, le=64)
    precision: _core(TrainSection, "precision") = "auto"  # type: ignore[valid-type]  # bf16 on CUDA, fp32 on CPU
    seed: int = Field(0, ge=0, le=2**31 - 1)
    checkpoint_every: _core(TrainSection, "checkpoint_every", le=10_000_000) = 1000  # type: ignore[valid-type]
    keep_last_n: _core(TrainSection, "keep_last_n", le=1000) = 3  # type: ignore[valid-type]
    sample_every: _core(SamplingSection, "every", le=10_000_000) = 0  # type: ignore[valid-type]
    sample_prompts: list[Annotated[Text, Field(max_length=2000)]] = Field(default_factory=list, max_length=16)
    text_max_length: _core(TextEncoderSection, "max_length", le=1024) = Field(  # type: ignore[valid-type]
        256,
        description=(
            "Captions are padded/truncated to this many tokens in training ([text_encoder] max_length). Small values "
            "make short-caption and CPU runs much faster."
        ),
        examples=[64],
    )
    t_logit_mean: _core(ObjectiveSection, "t_logit_mean") = Field(  # type: ignore[valid-type]
        0.0,
        description=(
            "Flow-matching times are drawn as sigmoid(N(t_logit_mean, t_logit_std)); the reference uses (0, 1). A "
            "positive mean trains more at high noise, where composition is decided."
        ),
    )
    t_logit_std: _core(ObjectiveSection, "t_logit_std") = 1.0  # type: ignore[valid-type]
    adapter: AdapterSpec | None = Field(
        None, description="Train an adapter on base_model instead of fine-tuning the whole model."
    )
    cache: TrainCache | None = Field(None, description="Cache latents and/or text states before training.")
    webhook: WebhookUrl = None

    @field_validator("arch")
    @classmethod
    def _arch_or_base(
        cls, arch: str | dict[str, Any] | None, info: ValidationInfo
    ) -> str | dict[str, Any] | None:
        if arch is not None and info.data.get("base_model") is not None:
            raise ValueError("arch is only allowed when base_model is null (pretraining from scratch)")
        return arch

    @model_validator(mode="after")
    def _default_arch(self) -> TrainRequest:
        if self.base_model is None and self.arch is None:
            self.arch = "xut-small"
        return self


class MergeRequest(Strict):
    """``POST /v1/models/{id}/merge``: the model with these adapters merged in, written as a new model."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"adapters": [{"id": "adp_0192f3a1b2c3d4e5f6a7b8", "weight": 1.0}]}]},
    )
    adapters: list[AdapterRef] = Field(min_length=1, max_length=8)
    name: Text | None = Field(None, min_length=1, max_length=200, description="Name of the merged model.")


class ModelImportRequest(Strict):
    """``POST /v1/models/import`` (admin key): register a checkpoint file already under the models folder."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"path": "hdm-xut-340M-1024px-note.safetensors"}]}
    )
    path: Text = Field(
        min_length=1, max_length=1000, description="A .safetensors file under the models folder."
    )
    name: Text | None = Field(None, min_length=1, max_length=200, description="Default: the file's stem.")
    revive: bool = Field(
        False, description="Register the file of a deleted model again (lifts its tombstone)."
    )


class DatasetRequest(Strict):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "cats", "path": "cats"}]}
    )
    name: Text = Field(min_length=1, max_length=300)
    path: Text = Field(min_length=1, max_length=1000, description="Folder under the server's data root.")
    webhook: WebhookUrl = None
