"""Request/response schemas (pydantic v2) with limits and examples; these are the OpenAPI contract."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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

MAX_SEED = 2**63 - 1


def _no_nul(v: str) -> str:
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    return v


Text = Annotated[str, AfterValidator(_no_nul)]


def _url(v: AnyHttpUrl) -> str:
    return str(v)


_HttpUrl = Annotated[AnyHttpUrl, UrlConstraints(max_length=2000), AfterValidator(_url)]
WebhookUrl = Annotated[_HttpUrl | None, Field(
    None, description="Called with the job object (signed) when the job reaches a final status.")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Camera(Strict):
    x_shift: float = Field(0.0, ge=-5, le=5)
    y_shift: float = Field(0.0, ge=-5, le=5)
    zoom: float = Field(1.0, ge=0.2, le=5)


class TreadGuidance(Strict):
    cond_rate: float = Field(0.0, ge=0, le=0.9)
    uncond_rate: float = Field(0.0, ge=0, le=0.9)


class ImageParams(Strict):
    """Fields shared by ``POST /v1/images`` and the OpenAI-compatible endpoint's extensions."""

    negative_prompt: Text = Field("", max_length=8000)
    model: Text | None = Field(None, max_length=300, description="A model id or name from /v1/models.")
    n: int = Field(1, ge=1, le=8)
    steps: int = Field(24, ge=1, le=200)
    guidance_scale: float = Field(3.0, ge=0, le=30, description="1 = no CFG (one pass per step).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Image i uses seed+i; null = random.")
    sampler: Text = Field("euler", max_length=40, description="A sampler the model lists in /v1/models/{id}.")
    camera: Camera = Field(default_factory=Camera)
    tread_guidance: TreadGuidance = Field(default_factory=TreadGuidance)
    output_format: Literal["png", "webp", "jpeg"] = "png"
    webhook: WebhookUrl = None

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, seed: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if seed is not None and seed + n - 1 > MAX_SEED:
            raise ValueError(f"seed + n - 1 must be <= {MAX_SEED}")
        return seed


class ImageRequest(ImageParams):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "prompt": "a watercolor fox in a misty forest", "negative_prompt": "blurry", "width": 1024, "height": 1024,
        "steps": 24, "guidance_scale": 3.0, "seed": 42, "n": 1, "output_format": "png"}]})

    prompt: Text = Field(min_length=1, max_length=8000)
    width: int = Field(1024, ge=16, le=8192, description="Multiple of 16; 256..2048 by default (server setting).")
    height: int = Field(1024, ge=16, le=8192, description="Multiple of 16; 256..2048 by default (server setting).")


class OpenAIImageRequest(ImageParams):
    """OpenAI ``images.generate`` body plus the extension fields; unknown OpenAI options are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, json_schema_extra={"examples": [
        {"prompt": "a lighthouse at dusk", "size": "1024x1024", "n": 1, "response_format": "b64_json"}]})

    prompt: Text = Field(min_length=1, max_length=8000)
    size: Text = Field("1024x1024", max_length=20, pattern=r"^\d{1,5}x\d{1,5}$", description="WxH")
    response_format: Literal["b64_json", "url"] = "b64_json"


class Progress(BaseModel):
    step: int
    total: int


class ModelRef(BaseModel):
    id: str | None
    name: str | None


class ImageOut(BaseModel):
    index: int
    seed: int
    width: int
    height: int
    url: str


class JobError(BaseModel):
    code: str
    message: str


class ImageJob(BaseModel):
    id: str = Field(examples=["img_0192f3a1b2c3d4e5f6a7b8"])
    object: Literal["image_job"] = "image_job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: str
    started_at: str | None
    finished_at: str | None
    queue_position: int | None
    progress: Progress
    request: dict[str, Any]
    model: ModelRef
    images: list[ImageOut]
    error: JobError | None
    timings: dict[str, float | None]
    attempts: int
    model_cache_hit: bool | None = Field(None, description="The worker had this model loaded already.")


class ImageJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ImageJob]
    has_more: bool


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class Event(BaseModel):
    id: int
    type: str
    data: dict[str, Any]
    created_at: str


class Stage(Strict):
    resolution: int = Field(256, ge=16, le=4096)
    steps: int | None = Field(None, ge=1, le=10_000_000)
    epochs: int | None = Field(None, ge=1, le=100_000)
    batch_size: int = Field(8, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=1024)
    lr: float = Field(1e-4, gt=0, le=1)
    tread_rate: float = Field(0.5, ge=0, le=0.9)
    grad_checkpointing: bool = False
    caption_dropout: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0, le=10_000_000)

    @model_validator(mode="after")
    def _one_length(self) -> Stage:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        return self


class TrainRequest(Strict):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [{
        "name": "pixel-debug", "base_model": None, "arch": "xut-pixel-debug", "dataset": "ds_0192f3a1b2c3d4e5f6a7b8",
        "stages": [{"resolution": 64, "steps": 100, "batch_size": 4, "lr": 3e-4}], "gpus": 1, "precision": "fp32",
        "text_max_length": 64}]})

    name: Text = Field("", max_length=200)
    base_model: Text | None = Field(None, max_length=300)
    arch: Text | dict[str, Any] | None = Field(None, description="Preset name or architecture object.")
    dataset: Text = Field(max_length=64)
    stages: list[Stage] = Field(min_length=1, max_length=16)
    gpus: int = Field(1, ge=1, le=64)
    nodes: int = Field(1, ge=1, le=64)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    checkpoint_every: int = Field(1000, ge=1, le=10_000_000)
    keep_last_n: int = Field(3, ge=1, le=1000)
    sample_every: int = Field(0, ge=0, le=10_000_000)
    sample_prompts: list[Annotated[Text, Field(max_length=2000)]] = Field(default_factory=list, max_length=16)
    text_max_length: int = Field(256, ge=1, le=1024, description=(
        "Captions are padded/truncated to this many tokens in training ([text_encoder] max_length). Small values "
        "make short-caption and CPU runs much faster."), examples=[64])
    t_logit_mean: float = Field(0.0, ge=-4, le=4, description=(
        "Flow-matching times are drawn as sigmoid(N(t_logit_mean, t_logit_std)); the reference uses (0, 1). A "
        "positive mean trains more at high noise, where composition is decided."))
    t_logit_std: float = Field(1.0, gt=0, le=4)
    webhook: WebhookUrl = None

    @field_validator("arch")
    @classmethod
    def _arch_or_base(cls, arch: str | dict[str, Any] | None, info: ValidationInfo) -> str | dict[str, Any] | None:
        if arch is not None and info.data.get("base_model") is not None:
            raise ValueError("arch is only allowed when base_model is null (pretraining from scratch)")
        return arch

    @model_validator(mode="after")
    def _default_arch(self) -> TrainRequest:
        if self.base_model is None and self.arch is None:
            self.arch = "xut-small"
        return self


class DatasetRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "cats", "path": "cats"}]})
    name: Text = Field(min_length=1, max_length=300)
    path: Text = Field(min_length=1, max_length=1000, description="Folder under the server's data root.")
    webhook: WebhookUrl = None
