# syntax=docker/dockerfile:1
#
# Two images from one file (docs/deploy.md):
#   docker build --target gateway -t imagegate-gateway .   # HTTP gateway, no torch
#   docker build --target worker  -t imagegate-worker  .   # `imagegate worker` for local models
#
# No secret is baked in: IMAGEGATE_SECRET_KEY, the database URL, S3 credentials and the like are
# given at run time (deploy/compose.yaml, deploy/kubernetes/).

ARG PYTHON_IMAGE=python:3.11-slim

# --- base: the interpreter and the unprivileged user both runtime images share ---------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed uid/gid, so that Kubernetes' runAsUser and volume ownership can name it.
RUN groupadd --system --gid 10001 imagegate \
 && useradd --system --uid 10001 --gid imagegate --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin imagegate \
 && mkdir -p /data \
 && chown imagegate:imagegate /data \
 && chmod 0700 /data

# --- build: the imagegate wheel, built once for both images ----------------------------------
FROM base AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/imagegate

# --- gateway-env: the package without the `local` extra (no torch, no diffusers) --------------
FROM build AS gateway-env
RUN /opt/imagegate/bin/pip install /wheels/imagegate-*.whl

# --- worker-env: the package with the `local` extra -------------------------------------------
FROM build AS worker-env
# torch is pinned by the project (pyproject.toml: torch==2.13.0) and comes from PyTorch's own
# index. The default is the CPU build (small; enough for the demo model). For GPU workers
# build with the CUDA build that the nodes' driver supports, e.g.
#   docker build --target worker \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t imagegate-worker .
# (deploy/compose.yaml does so). `imagegate[local]` then keeps the torch installed here:
# 2.13.0+cpu and 2.13.0+cu128 both satisfy ==2.13.0.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN /opt/imagegate/bin/pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && /opt/imagegate/bin/pip install "$(ls /wheels/imagegate-*.whl)[local]"

# --- gateway: the HTTP server ------------------------------------------------------------------
FROM base AS gateway
COPY --from=gateway-env /opt/imagegate /opt/imagegate
# Local models run on the worker tier: this image has no torch to run them inline.
ENV PATH=/opt/imagegate/bin:$PATH \
    IMAGEGATE_HOST=0.0.0.0 \
    IMAGEGATE_PORT=8000 \
    IMAGEGATE_DATA_DIR=/data \
    IMAGEGATE_LOCAL_EXECUTION=workers
USER imagegate:imagegate
WORKDIR /data
EXPOSE 8000
# Liveness only (/healthz): /readyz also fails while the database is away, and a restart
# would not bring it back.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('IMAGEGATE_PORT', '8000') + '/healthz', timeout=2)"]
ENTRYPOINT ["imagegate"]
CMD ["serve"]

# --- worker: `imagegate worker`, one per GPU ---------------------------------------------------
FROM base AS worker
COPY --from=worker-env /opt/imagegate /opt/imagegate
# HF_HOME: where a hub model id is cached (mount a volume there, or point models at a folder).
# Prometheus scrapes the worker's metrics on 9464 from outside the container.
ENV PATH=/opt/imagegate/bin:$PATH \
    IMAGEGATE_DATA_DIR=/data \
    IMAGEGATE_WORKER_METRICS_HOST=0.0.0.0 \
    IMAGEGATE_WORKER_METRICS_PORT=9464 \
    HF_HOME=/data/huggingface
USER imagegate:imagegate
WORKDIR /data
EXPOSE 9464
# Arguments are the worker's: `docker run imagegate-worker --models imagegate-demo`.
ENTRYPOINT ["imagegate", "worker"]
