# syntax=docker/dockerfile:1
# HDM Serve: one image for the API (default command), the GPU workers (`hdm worker`) and the migration job
# (`hdm migrate`). See docs/deployment.md.
#
#   docker build -t hdm-serve:latest .
#
# Build args:
#   CUDA_IMAGE       base image. The torch wheel brings its own CUDA libraries (cuBLAS, cuDNN, NCCL), so the small
#                    "base" flavour is enough; its CUDA major version should match the wheel's (torch 2.13 from pip's
#                    default index is built for CUDA 13, which needs an NVIDIA driver >= 580).
#   TORCH_VERSION    the torch release the image installs.
#   TORCH_INDEX_URL  optional index torch comes from; no default (empty = pip's default index). For older drivers
#                    pass PyTorch's cu128 wheel index together with CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04.
#   TORCH_FIND_LINKS optional folder (or page) of wheels pip also looks in, e.g. a CPU torch wheel mounted into
#                    the build (`podman build -v /opt/wheels:/wheels:ro --build-arg TORCH_FIND_LINKS=/wheels`); pip
#                    takes the highest matching version, and a local "2.13.0+cpu" sorts above "2.13.0".
#   PIP_CERT         optional CA bundle pip trusts, for a network behind a TLS-inspecting proxy (mount it into the
#                    build with -v); build time only, not kept in the image.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# --------------------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL
ARG TORCH_FIND_LINKS
ARG PIP_CERT
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's python3 (3.12 on 24.04). Distribution packages follow the base image's snapshot; not pinned on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# The heavy, rarely changing layer first: torch (several GB with its CUDA libraries).
COPY docker/constraints.txt docker/constraints.txt
RUN pip install --constraint docker/constraints.txt pip setuptools wheel \
    && pip install --constraint docker/constraints.txt \
        ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} \
        "torch==${TORCH_VERSION}"

# Then the project's pinned dependencies, read from pyproject.toml alone: a change to the code reuses this layer
# (and the runtime stage's copy of the venv) instead of reinstalling and copying several GB again.
COPY pyproject.toml pyproject.toml
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --constraint docker/constraints.txt --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# --------------------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
ARG HDM_UID=10001
ENV DEBIAN_FRONTEND=noninteractive

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${HDM_UID}" hdm \
    && useradd --uid "${HDM_UID}" --gid hdm --create-home --home-dir /home/hdm --shell /usr/sbin/nologin hdm \
    && mkdir -p /data/models/checkpoints /data/models/text-encoder /data/models/vae /data/datasets /data/outputs /data/runs /data/cache \
    && chown -R hdm:hdm /data

COPY --from=builder /opt/venv /opt/venv
# The project itself, installed in place (editable) at /app: the code that runs is the tree that also holds
# alembic.ini, migrations/ and configs/. No network: its dependencies are all in the venv already.
WORKDIR /app
COPY . .
RUN PIP_NO_CACHE_DIR=1 /opt/venv/bin/pip install --constraint docker/constraints.txt --no-index --no-deps \
        --no-build-isolation --editable . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -I -c "import app, worker, hdm_core" && test -x /opt/venv/bin/hdm

# No secrets here: keys, passwords and the webhook secret come from the environment at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/hdm \
    HF_HOME=/data/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HDM_DATA_ROOT=/data/datasets \
    HDM_MODELS_DIR=/data/models/checkpoints \
    HDM_OUTPUTS_DIR=/data/outputs \
    HDM_RUNS_DIR=/data/runs

USER ${HDM_UID}:${HDM_UID}
EXPOSE 8000

# Liveness of the API process (GET /healthz). Workers run the same image and switch this off in compose.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

# The API. Workers: `hdm worker`; migrations: `hdm migrate` (see docker-compose.yml).
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "30"]
