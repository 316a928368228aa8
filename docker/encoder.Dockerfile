# syntax=docker/dockerfile:1.7
# Encoder tier on NVIDIA GPUs (also runs on CPU). Build from the repository root:
#   docker build -f docker/encoder.Dockerfile -t ghcr.io/sam2-serving/encoder:0.1.0 .
# Needs the NVIDIA container toolkit on the host at run time (docker run --gpus all ...).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- build: a venv with CUDA torch, the pinned dependencies and this project
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index, so the project's torch>=2.5 is already satisfied.
RUN pip install --index-url ${TORCH_INDEX} torch==${TORCH_VERSION}
WORKDIR /src
COPY docker/constraints.txt ./
COPY pyproject.toml ./
COPY sam2_shared ./sam2_shared
COPY encoder_service ./encoder_service
COPY decoder_service ./decoder_service
RUN pip install --constraint constraints.txt '.[server]'

# ---- runtime: the CUDA runtime libraries, Python and the venv; no compilers, no pip cache
FROM ${CUDA_IMAGE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sam2 \
    && useradd --system --uid 10001 --gid sam2 --home-dir /tmp --shell /usr/sbin/nologin sam2 \
    && mkdir -p /var/cache/sam2 && chown sam2:sam2 /var/cache/sam2
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SAM2_CHECKPOINT_DIR=/var/cache/sam2
# Read-only root filesystem friendly: only /tmp and /var/cache/sam2 are written.
USER 10001:10001
EXPOSE 50051 9101
ENTRYPOINT ["sam2-encoder"]
