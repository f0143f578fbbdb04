# syntax=docker/dockerfile:1.7
#
# lfm2audio-server image (see docs/deployment.md).
#
#   GPU (default):  docker build -t lfm2audio-server .
#   CPU:            docker build --build-arg VARIANT=cpu -t lfm2audio-server:cpu .
#
# The CUDA variant installs the CUDA 13.0 build of torch and needs an NVIDIA driver that supports
# CUDA 13.0 (R580 or newer). For an older driver pick an older CUDA build of torch and the matching
# base, e.g. --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
#            --build-arg TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
# (provided PyTorch publishes that build for TORCH_VERSION).

ARG VARIANT=cuda
# torch's CUDA wheels carry their own CUDA libraries (cuBLAS, cuDNN, NCCL, ...), so the CUDA base only
# has to hook up the driver (NVIDIA_* variables, driver version check): the small "base" flavour is enough.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-cuda
FROM ${CPU_IMAGE} AS base-cpu

# base-${VARIANT} is one of the two stages above (both tagged), not an untagged image.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime

ARG VARIANT
# CI tests the project against this torch version.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG DEBIAN_FRONTEND=noninteractive

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04 ships Python 3.12. Versions float with the (pinned) base image's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Fixed numeric ids so Kubernetes' runAsNonRoot can verify the user and volumes can be chowned to it.
RUN groupadd --system --gid 10001 lfm2audio \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/lfm2audio lfm2audio

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv "$VIRTUAL_ENV"

# Dependency layer: torch from the index of the variant, then the runtime and server requirements read
# from pyproject.toml. Only pyproject.toml is copied here, so editing the source reuses this layer.
WORKDIR /opt/lfm2audio-src
COPY pyproject.toml ./
RUN if [ "$VARIANT" = cpu ]; then torch_index="$TORCH_CPU_INDEX"; else torch_index="$TORCH_CUDA_INDEX"; fi \
    && pip install --no-cache-dir --index-url "$torch_index" "torch==${TORCH_VERSION}" \
    && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && python -c "import sys, torch; cpu = sys.argv[1] == 'cpu'; assert (torch.version.cuda is None) == cpu, (torch.__version__, torch.version.cuda)" "$VARIANT" \
    && rm /tmp/requirements.txt /tmp/constraints.txt

# The source (the .dockerignore lets only the packages lfm2audio/, server/ and clients/python/, plus
# pyproject.toml, README.md, LICENSE and the web client clients/web through).
COPY . ./
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && lfm2audio-server --help > /dev/null \
    && rm -rf /opt/lfm2audio-src/build /opt/lfm2audio-src/*.egg-info

# The CPU image ships the int4 kernel built (lfm2audio/model/w4a8.py; its AVX2 and AVX-512 VNNI paths are
# picked at run time): a compiler is installed for this step only. Where the build machine has no AVX2
# (an emulated build) nothing is built, and int4 layers use PyTorch's slower kernel.
ENV LFM2AUDIO_KERNEL_CACHE=/opt/lfm2audio-kernels
# hadolint ignore=DL3008
RUN if [ "$VARIANT" = cpu ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && python -c "from lfm2audio.model import w4a8; print('int4 kernel built:', w4a8.available())" \
        && apt-get purge -y --auto-remove gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Hugging Face cache: mount a volume here so weights survive restarts and are shared between replicas.
# The server binds 127.0.0.1 by default: listen on all interfaces of the container. The web client is
# served at / when it is part of the checkout (the server ignores a missing folder).
ENV HF_HOME=/data/hf \
    LFM2AUDIO_HOST=0.0.0.0 \
    LFM2AUDIO_PORT=8000 \
    LFM2AUDIO_STATIC_DIR=/opt/lfm2audio-src/clients/web
RUN mkdir -p "$HF_HOME" && chown 10001:10001 "$HF_HOME"
VOLUME ["/data/hf"]

USER 10001:10001
WORKDIR /home/lfm2audio
EXPOSE 8000

# Healthy once the model is loaded and warmed up (/ready); the start period covers the first download.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20m --start-interval=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LFM2AUDIO_PORT', '8000'), timeout=4)"]

# The server drains on SIGTERM (LFM2AUDIO_SHUTDOWN_GRACE, default 30 s): give `docker stop` a longer -t.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lfm2audio-server"]
