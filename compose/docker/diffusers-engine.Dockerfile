# A Conduit diffusers (image) engine on NVIDIA GPUs: Conduit, CUDA torch and diffusers, no vLLM.
# The image libraries carry the `gpu` extra's bounds (tests/unit/test_compose.py keeps them in
# step); transformers (the pipelines' CLIP text encoders) comes with vLLM in that extra, so it
# is named here, at the `cpu` extra's bound; so is aiohttp (engines fetch the media URLs a policy
# allows themselves: engines/media.py). CUDA comes in torch's wheels (PyPI's Linux torch
# is its CUDA build); the host provides only the driver (NVIDIA Container Toolkit).
#
# Build from the repository root with BuildKit (it reads diffusers-engine.Dockerfile.dockerignore);
# a cold build downloads several GB of wheels (CUDA torch and its nvidia-* libraries):
#   DOCKER_BUILDKIT=1 docker build -f compose/docker/diffusers-engine.Dockerfile -t conduit/diffusers-engine:0.1.0 .
# The stages, in order; the ones before `cuda-wheels` download no CUDA wheel, and CI builds
# only those (tests/deploy/test_images.py):
#   conduit-wheel     Conduit's own wheel, no dependencies
#   runtime-base      the runtime without its Python packages: env, gcc/g++, the conduit user,
#                     an empty venv, the health check and entrypoint
#   cuda-wheels       wheels for Conduit, CUDA torch, diffusers and every dependency
#   diffusers-engine  runtime-base + those wheels installed: the image (the default target)

# ---- conduit-wheel: Conduit's own wheel -------------------------------------------------
FROM python:3.11.14-slim-bookworm AS conduit-wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY engines/ engines/
COPY telemetry/ telemetry/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime-base: everything of the runtime but its Python packages --------------------
FROM python:3.11.14-slim-bookworm AS runtime-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/conduit \
    PATH=/opt/conduit/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    XDG_CACHE_HOME=/var/cache/conduit \
    HF_HOME=/var/cache/conduit/huggingface \
    TRITON_CACHE_DIR=/var/cache/conduit/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/conduit/inductor \
    DO_NOT_TRACK=1
# `--compile` (torch.compile: Inductor's Triton kernels and C++ wrappers) needs a C compiler
# and libc headers at run time; Python's headers are already in this image.
# DL3008 (pin apt versions): Debian's archive drops a package's old version when a security
# update replaces it, so an exact pin breaks the build; the base image's tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/conduit \
    && groupadd --system --gid 10001 conduit \
    && useradd --system --uid 10001 --gid conduit --home-dir /home/conduit --create-home conduit \
    && install -d -o conduit -g conduit /var/cache/conduit /var/lib/conduit/images /models
EXPOSE 9100
STOPSIGNAL SIGTERM
# Alive = the Prometheus endpoint answers (engines serve no other HTTP). It starts before the
# pipeline loads; readiness is the engine's heartbeat in Redis (the gateway's /ready, /v1/models).
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/ready', timeout=2)"]
ENTRYPOINT ["conduit", "engine", "--kind", "diffusers"]
CMD ["--model", "/models/model", "--metrics-port", "9100"]

# ---- cuda-wheels: wheels for Conduit, torch, diffusers and every dependency --------------
FROM conduit-wheel AS cuda-wheels
# Conduit's wheel from conduit-wheel: the image installs the wheel CI built.
RUN pip wheel --wheel-dir /wheels /wheels/*.whl torch "diffusers>=0.42,<0.43" "pillow>=10" \
        "transformers>=4.56" "aiohttp>=3.12"

# ---- diffusers-engine: the image -------------------------------------------------------
FROM runtime-base AS diffusers-engine
# The wheels are bind-mounted from cuda-wheels, so they never land in a layer.
RUN --mount=type=bind,from=cuda-wheels,source=/wheels,target=/wheels \
    pip install --no-index /wheels/*.whl
USER 10001:10001
WORKDIR /home/conduit
