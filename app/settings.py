"""Service settings: one pydantic-settings object, read from the environment (prefix ``HDM_``) and cached."""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_WEBHOOK_SECRET = "change-me"
# hdm_core.precision.DTypeSetting and hdm_core.compile.CompileMode (the API process never imports torch)
DTYPES = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HDM_", env_file=None, extra="ignore")

    database_url: str = "sqlite:///var/hdm.db"
    # "redis://..." runs Celery; "db://" (embedded mode) uses the jobs table as the queue.
    broker_url: str = "redis://127.0.0.1:6379/0"
    data_root: Path = Path("var/data")
    models_dir: Path = Path("var/models")
    outputs_dir: Path = Path("var/outputs")
    runs_dir: Path = Path("var/runs")
    text_encoder: Path | None = None
    # diffusers AutoencoderKL folder: latent (non-pixel) training, and image jobs whose checkpoint carries no VAE
    vae: Path | None = None
    default_model: str | None = None
    device: str = "cpu"
    # Inference precision of the worker and `hdm generate`: auto = bf16 on CUDA, fp32 on CPU (hdm_core.precision).
    dtype: str = "auto"
    # torch.compile of the XUT in the image worker (hdm_core.compile), compiled and warmed up per shape on first use
    compile: str = "off"
    # Queued image jobs with the same settings sampled as one network batch (worker/batcher.py); 0 = auto: 8 on a
    # CUDA device, 1 (no batching) on CPU, where a bigger batch is not faster per image (bench/batch.py).
    max_batch: int = Field(0, ge=0, le=64)
    # Tokens the network reads per step in one batch (each image's patches + text tokens, per CFG branch;
    # worker/batcher.py): 8192 lets a 1024 px image (4096 patches at 16 px each) run alone, as it is compute-bound,
    # and up to ~25 images of 256 px share a forward. A job alone may exceed it. 0 = no budget.
    batch_tokens: int = Field(8192, ge=0)

    api_keys: str = ""  # comma-separated; empty = open (embedded mode only, warned at start)
    require_api_keys: bool = False
    # comma-separated keys that may also manage shared models (delete, mark default) and read /metrics
    admin_keys: str = ""
    metrics_open: bool = False  # /metrics without a key (a scraper on a private network); default: admin key
    worker_metrics_port: int | None = Field(
        None, ge=1, le=65535
    )  # a worker's own /metrics (worker/metrics.py)
    max_arch_params: int = 20_000_000_000  # architecture objects of train jobs: parameter count at most this

    webhook_secret: str = DEFAULT_WEBHOOK_SECRET
    # Webhook targets allowed besides public addresses: comma-separated "scheme://host:port" entries (port defaults
    # to the scheme's). Loopback, private, link-local and other non-public addresses are refused unless listed.
    webhook_allow_hosts: str = ""
    webhook_allow_public: bool = (
        False  # also any http(s) target whose address (checked when sending) is public
    )
    webhook_max_attempts: int = 5
    webhook_backoff_s: float = 2.0
    webhook_timeout_s: float = 10.0

    queue_limit: int = 100  # queued jobs per API key
    retry_after_s: int = 5
    slots: str = "0"  # comma-separated GPU indices (or CPU slot numbers) of the whole cluster
    gpu_index: int | None = None  # the slot this worker process serves (worker processes only)
    worker_queues: str = ""  # default: hdm.gpu.<gpu_index>,hdm.images,hdm.train.<gpu_index>
    # Slots that share a machine, ";"-separated groups ("0,1,2,3;4,5,6,7"): a train job's `gpus` are leased within
    # one group, its `nodes` on that many groups (docs/deployment.md). Default: all slots are one machine.
    slot_groups: str = ""
    # Multi-node train jobs (app/services/nodes.py): the address other machines reach this one at (torchrun
    # --local-addr; the rendezvous endpoint when this machine runs node 0), the rendezvous port base (node 0 listens
    # on rdzv_port + its first slot, so jobs on one machine never share a port) and how long node 0 waits for the
    # other nodes' trainers to take their part before the job fails.
    node_addr: str = ""
    rdzv_port: int = Field(29400, ge=1024, le=65000)
    node_join_timeout_s: float = Field(120.0, gt=0)
    # The trainer service (`hdm worker --trainer`, no HDM_GPU_INDEX): the slots of its machine in local GPU order
    # (slot -> CUDA index = position here). Default: the group of HDM_SLOTS it belongs to / all slots.
    local_slots: str = ""
    max_attempts: int = 3
    heartbeat_s: float = 5.0
    stale_after_s: float = 30.0
    maintenance_interval_s: float = 2.0
    maintenance_in_api: bool = True
    reenqueue_grace_s: float = 5.0
    reconcile_interval_s: float = 60.0  # full broker-vs-DB scan; immediate when the broker lost its state
    force_cancel_after_s: float = 30.0
    visibility_timeout_s: int = 6 * 3600
    queue_prefix: str = "hdm"

    image_min_size: int = 256
    image_max_size: int = 2048
    image_size_multiple: int = 16
    image_max_pixels: int = 4_200_000
    max_wait_s: int = 60
    # init images and masks of edit requests (app/uploads.py): per file, after base64 decoding; width x height
    upload_max_bytes: int = 20 * 2**20
    upload_max_pixels: int = 4096 * 4096
    uploads_dir: Path | None = (
        None  # validated uploads as PNG; default HDM_OUTPUTS_DIR/uploads (worker reads them)
    )
    # Retention (app/services/storage.py, run by the maintenance loop); 0 = keep. Fractions allowed (0.5 = 12 h).
    outputs_ttl_days: float = Field(0.0, ge=0)  # image job outputs, counted from the job's end
    uploads_ttl_hours: float = Field(0.0, ge=0)  # init images and masks no queued or running job needs
    # Bytes one key may store (outputs, uploads, its models and adapters); over it, new jobs get 507. 0 = no quota.
    key_storage_bytes: int = Field(0, ge=0)
    sync_timeout_s: int = 600  # /v1/images/generations
    train_kill_grace_s: float = 15.0  # SIGTERM to the trainer's process group, then SIGKILL after this
    # the trainer's process-group timeout ([train] dist_timeout_s): the longest a rank waits for the others
    dist_timeout_s: int = Field(1800, ge=1)
    cpu_threads: int = (
        0  # torch intra-op threads per trainer process ([train] num_threads); 0 = torch's default
    )
    train_command: str = (
        ""  # override the trainer launcher (tests use a stand-in); default torchrun hdm_core.train
    )
    # POST /v1/adapters and POST /v1/datasets (multipart, streamed to disk): the file's bytes at most
    adapter_upload_bytes: int = Field(2 * 2**30, ge=1)
    dataset_upload_bytes: int = Field(2 * 2**30, ge=1)
    tagger: Path | None = None  # a WD14-style tagger folder (model.onnx + selected_tags.csv), app/tagger.py
    tagger_threshold: float = Field(0.35, gt=0, lt=1)

    @field_validator("text_encoder", "vae", "uploads_dir", "tagger", mode="before")
    @classmethod
    def _unset(cls, v: object) -> object:
        return None if v == "" else v  # `HDM_VAE=` (compose passes unset variables as empty) means none

    @field_validator("dtype", "compile")
    @classmethod
    def _choice(cls, v: str, info: ValidationInfo) -> str:
        choices = DTYPES if info.field_name == "dtype" else COMPILE_MODES
        v = v.strip().lower()
        if v not in choices:
            raise ValueError(
                f"HDM_{str(info.field_name).upper()} must be one of {', '.join(choices)}; got {v!r}"
            )
        return v

    @field_validator("data_root", "models_dir", "outputs_dir", "runs_dir", "uploads_dir")
    @classmethod
    def _abs(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser().resolve()

    @property
    def uploads_root(self) -> Path:
        return self.uploads_dir or self.outputs_dir / "uploads"

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def admin_key_list(self) -> list[str]:
        return [k.strip() for k in self.admin_keys.split(",") if k.strip()]

    @property
    def webhook_hosts(self) -> list[str]:
        return [h.strip().lower() for h in self.webhook_allow_hosts.split(",") if h.strip()]

    @property
    def image_batch_limit(self) -> int:
        """Image jobs per network batch (HDM_MAX_BATCH; 0 = 8 on CUDA, 1 on CPU)."""
        return self.max_batch or (8 if self.device.startswith("cuda") else 1)

    @property
    def slot_list(self) -> list[int]:
        return [int(s) for s in self.slots.split(",") if s.strip()]

    @property
    def embedded(self) -> bool:
        return self.broker_url.startswith("db:")

    @property
    def image_queue(self) -> str:
        return f"{self.queue_prefix}.images"

    def slot_queue(self, slot: int) -> str:
        return f"{self.queue_prefix}.gpu.{slot}"

    def train_queue(self, slot: int) -> str:
        """Train jobs whose first leased slot is ``slot`` (consumed by the trainer service of that machine, or by
        the slot's own worker where there is no trainer service)."""
        return f"{self.queue_prefix}.train.{slot}"

    @property
    def slot_group_list(self) -> list[list[int]]:
        groups = [[int(x) for x in g.split(",") if x.strip()] for g in self.slot_groups.split(";")]
        groups = [g for g in groups if g]
        return groups or [self.slot_list]

    @property
    def local_slot_list(self) -> list[int]:
        return [int(s) for s in self.local_slots.split(",") if s.strip()] or self.slot_group_list[0]

    @property
    def all_queues(self) -> list[str]:
        return [
            self.image_queue,
            *(self.slot_queue(s) for s in self.slot_list),
            *(self.train_queue(s) for s in self.slot_list),
        ]


@functools.cache
def get_settings() -> Settings:
    return Settings()
