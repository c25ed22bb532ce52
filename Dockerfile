# ndot-stream: one image for the API (`ndot api`), the worker (`ndot worker`), `ndot serve` and the client.
#
# CPU (default):  docker build -t ndot-stream .
# CUDA:           docker build -t ndot-stream:cuda \
#                   --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#                 (run with `--gpus all`; the worker's NDOT_DEVICE=auto then picks cuda)
# Compiled steps: the image carries g++ (~200 MB) so that NDOT_COMPILE=auto compiles on CPU (the
# compiled worker answers ~1.15x the camera frames of the eager one on 2 cores: docs/benchmarks.md);
# `--build-arg WITH_COMPILER=0` leaves it out, and `auto` then stays eager.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG WITH_COMPILER=1

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN if [ "${WITH_COMPILER}" = "1" ]; then \
        apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi

# CUDA bases carry no Python >= 3.11 of their own: take the distribution's (Ubuntu 24.04: 3.12).
RUN if ! python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip

# torch first, from the chosen index (a plain `pip install torch` would pull the multi-GB CUDA build).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ndot_core ./ndot_core
COPY service ./service
COPY clients ./clients
RUN pip install . \
    && useradd --create-home --uid 10001 ndot \
    && mkdir -p /data/checkpoints \
    && chown -R ndot:ndot /data

USER ndot
ENV NDOT_HOST=0.0.0.0 \
    NDOT_PORT=8000 \
    NDOT_CHECKPOINT_DIR=/data/checkpoints
VOLUME ["/data/checkpoints"]
EXPOSE 8000 9101

# Health checks are per role (API: /healthz, worker: its /metrics port): see docker-compose.yml.
CMD ["ndot", "serve"]
