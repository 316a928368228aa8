# Encoder tier on NVIDIA GPUs (also runs on CPU). Build from the repository root:
#   docker build -f docker/encoder.Dockerfile -t ghcr.io/sam2-serving/encoder:0.1.0 .
# Needs the NVIDIA container toolkit on the host at run time (docker run --gpus all ...).
# Where no image registry is reachable, scripts/build_images.sh builds on a local Debian base
# (BASE_IMAGE) with torch from a local wheel (docker/pip/, TORCH_INDEX, TORCH_VERSION).
# No "# syntax=" line: it would pull a frontend image; the stock Dockerfile syntax suffices.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

# ---- build: a venv with CUDA torch, the pinned dependencies and this project
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# The slim Python image has Python; a bare Debian or CUDA base gets it from apt.
RUN command -v python3 >/dev/null \
    || (apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*)
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# docker/pip/ (README there): wheels offered beside the index and, where TLS to the
# index is intercepted, the CA bundle named by PIP_CERT. torch first, on its own, so the
# project's torch>=2.5 is already satisfied and no resolver step pulls a build of its own.
COPY docker/pip /pip
ARG PIP_CERT
# Declared above FROM: the two Dockerfiles' build stages are then the same text and
# share their layers when built with the same arguments (scripts/build_images.sh).
ARG TORCH_VERSION
ARG TORCH_INDEX
RUN pip install --find-links /pip --index-url ${TORCH_INDEX} torch==${TORCH_VERSION}
WORKDIR /src
COPY docker/constraints.txt ./
COPY pyproject.toml ./
COPY sam2_shared ./sam2_shared
COPY encoder_service ./encoder_service
COPY decoder_service ./decoder_service
RUN pip install --constraint constraints.txt '.[server]'

# ---- runtime: the CUDA runtime libraries, Python and the venv; no compilers, no pip cache
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN command -v python3 >/dev/null \
    || (apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*)
RUN groupadd --system --gid 10001 sam2 \
    && useradd --system --uid 10001 --gid sam2 --home-dir /tmp --shell /usr/sbin/nologin sam2 \
    && mkdir -p /var/cache/sam2 && chown sam2:sam2 /var/cache/sam2
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SAM2_CHECKPOINT_DIR=/var/cache/sam2
# Read-only root filesystem friendly: only /tmp and /var/cache/sam2 are written.
USER 10001:10001
EXPOSE 50051 9101
# gRPC health of the whole server on its port (SAM2_PORT when set); plaintext, so with TLS on
# that port use the orchestrator's probe instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD python /opt/healthcheck.py "${SAM2_PORT:-50051}"
ENTRYPOINT ["sam2-encoder"]
