"""Response schemas: the shapes the OpenAPI document shows for every endpoint. The JSON itself is built by
app/services/presenter.py; these models describe (and, for routes that return dicts, validate) it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# int stays int and float stays float on the way out (a plain float field would print 3 as 3.0)
Number = int | float


class Progress(BaseModel):
    step: int
    total: int


class ModelRef(BaseModel):
    id: str | None
    name: str | None


class AppliedAdapter(BaseModel):
    id: str
    name: str
    weight: Number


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
    status: Status
    created_at: str
    started_at: str | None
    finished_at: str | None
    queue_position: int | None
    progress: Progress
    request: dict[str, Any]
    model: ModelRef
    adapters: list[AppliedAdapter] = Field(description="Adapters applied on top of the model, with weights.")
    images: list[ImageOut]
    error: JobError | None
    timings: dict[str, float | None]
    attempts: int
    model_cache_hit: bool | None = Field(None, description="The worker had this model loaded already.")


class ImageJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ImageJob]
    has_more: bool


class ImageJobDeleted(BaseModel):
    id: str
    object: Literal["image_job"] = "image_job"
    deleted: Literal[True] = True
    files_deleted: int = Field(description="Output folders and uploads removed from disk.")


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class Event(BaseModel):
    id: int
    type: str = Field(examples=["status", "progress", "metrics", "cache", "log", "done"])
    data: dict[str, Any]
    created_at: str


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool


class TrainMetrics(BaseModel):
    loss: Number | None
    lr: Number | None
    images_per_s: Number | None
    eta_s: Number | None


class TrainNode(BaseModel):
    rank: int = Field(
        description="Node rank: node 0 hosts the rendezvous and reports metrics and checkpoints."
    )
    slots: list[int] = Field(description="The GPU slots of this node's machine leased to the run.")
    worker: str | None = Field(description="The trainer that took this node's part (null: not joined yet).")


class TrainJob(BaseModel):
    id: str = Field(examples=["train_0192f3a1b2c3d4e5f6a7b8"])
    object: Literal["train_job"] = "train_job"
    name: str
    status: Status
    created_at: str
    started_at: str | None
    finished_at: str | None
    request: dict[str, Any]
    base_model: str | None = Field(description="Id of the model fine-tuned (null: pretraining).")
    dataset: str | None
    stage: int | None = Field(description="Index of the stage running, from the latest metrics.")
    step: int
    total_steps: int | None
    epoch: Number | None
    metrics: TrainMetrics
    gpus: list[int] = Field(description="The GPU slots leased to the run (all nodes, node 0's first).")
    nodes: list[TrainNode] = Field(description="The machines of the run (one for a single-node job).")
    checkpoints: list[str] = Field(description="Ids of the models this run registered so far.")
    adapters: list[str] = Field(description="Ids of the adapters an adapter run registered so far.")
    error: JobError | None
    attempts: int


class TrainJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TrainJob]
    has_more: bool


class SampleFile(BaseModel):
    name: str = Field(description="Path relative to the run's samples folder.")
    url: str = Field(description="GET it (same key): the image file.")


class SampleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SampleFile]
    has_more: bool


class Dataset(BaseModel):
    id: str = Field(examples=["ds_0192f3a1b2c3d4e5f6a7b8"])
    object: Literal["dataset"] = "dataset"
    name: str
    path: str
    status: Literal["validating", "ready", "invalid"]
    stats: dict[str, Any] | None = Field(
        description="Image and caption counts, unreadable files, size histogram."
    )
    error: JobError | None
    created_at: str
    updated_at: str


class DatasetCreated(Dataset):
    validation_job: str


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Dataset]
    has_more: bool


class Model(BaseModel):
    id: str = Field(examples=["ckpt_0192f3a1b2c3d4e5f6a7b8"])
    object: Literal["model"] = "model"
    name: str
    arch: dict[str, Any] | None
    codec: str | None = Field(description="pixel | vae | none (null: unknown).")
    params: int | None
    source: str
    train_job: str | None
    step: int | None
    sha256: str | None
    path: str
    size_bytes: int | None
    created_at: str
    samplers: list[str]
    schedules: list[str] = Field(
        description="`schedule` choices of an image request (null: the sampler's own)."
    )
    shared: bool = Field(description="Every key sees it (models folder, imports); else one key's fine-tune.")
    default: bool = Field(description="Requests without `model` use it.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
    has_more: bool
    default_model: str | None = Field(None, description="The id requests without `model` use.")


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: Literal[True] = True
    file_deleted: bool = Field(description="Its weights file was removed from disk.")


class AdapterBase(BaseModel):
    name: str = Field(description="The model the adapter was trained on.")
    sha256: str
    arch: dict[str, Any]


class AdapterOut(BaseModel):
    id: str = Field(examples=["adp_0192f3a1b2c3d4e5f6a7b8"])
    object: Literal["adapter"] = "adapter"
    name: str
    algorithm: Literal["lokr", "lora", "loha"]
    config: dict[str, Any] = Field(description="rank, alpha, factor, full_matrix, train_norm, targets.")
    base_model: AdapterBase
    trigger_words: list[str]
    caption_sample: str
    steps: int = Field(description="Training steps.")
    params: int
    source: str = Field(description="file | train_job")
    train_job: str | None
    sha256: str
    path: str
    size_bytes: int
    created_at: str


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]
    has_more: bool


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: Literal[True] = True
    file_deleted: bool = Field(description="Its file was removed from disk.")


class MergeJob(BaseModel):
    id: str = Field(examples=["merge_0192f3a1b2c3d4e5f6a7b8"])
    object: Literal["merge_job"] = "merge_job"
    status: Status
    created_at: str
    started_at: str | None
    finished_at: str | None
    request: dict[str, Any]
    base_model: str | None
    model: str | None = Field(description="Id of the merged model, once registered.")
    error: JobError | None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Revision(BaseModel):
    current: str | None
    head: str | None


class Readiness(BaseModel):
    database: bool
    migrations: bool
    revision: Revision | None = Field(None, description="Absent when the database cannot be reached.")
    broker: bool
    ready: bool


class FolderUsage(BaseModel):
    bytes: int = Field(
        description="Bytes of the files below the folder (a nested service folder counted apart)."
    )
    files: int
    free_bytes: int = Field(description="Free bytes of the disk the folder is on.")


class GpuSlot(BaseModel):
    index: int
    job: str | None
    worker: str | None
    heartbeat_at: str | None


class System(BaseModel):
    object: Literal["system"] = "system"
    mode: Literal["embedded", "celery"]
    gpus: list[GpuSlot]
    workers: list[str]
    queue_depth: dict[str, int]
    running: dict[str, int]
    disk: dict[str, FolderUsage] = Field(
        description="uploads, outputs, models, runs, data: the service's folders."
    )
