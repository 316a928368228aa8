# syntax=docker/dockerfile:1.7
# Decoder tier (and the encoder tier on CPU: both entry points are installed). Build from the
# repository root:
#   docker build -f docker/decoder.Dockerfile -t ghcr.io/sam2-serving/decoder:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- build: a venv with CPU-only torch, the pinned dependencies and this project
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url ${TORCH_INDEX} torch==${TORCH_VERSION}
WORKDIR /src
COPY docker/constraints.txt ./
COPY pyproject.toml ./
COPY sam2_shared ./sam2_shared
COPY encoder_service ./encoder_service
COPY decoder_service ./decoder_service
RUN pip install --constraint constraints.txt '.[server]'

# ---- runtime: slim Python and the venv
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 sam2 \
    && useradd --system --uid 10001 --gid sam2 --home-dir /tmp --shell /usr/sbin/nologin sam2 \
    && mkdir -p /var/cache/sam2 && chown sam2:sam2 /var/cache/sam2
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SAM2_CHECKPOINT_DIR=/var/cache/sam2
USER 10001:10001
EXPOSE 50052 9102
ENTRYPOINT ["sam2-decoder"]
