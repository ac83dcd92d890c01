# The Conduit gateway (the HTTP edge). The project is installed without extras, so the image
# holds no torch, vLLM or diffusers: the gateway never imports them.
#
# Build from the repository root (BuildKit reads gateway.Dockerfile.dockerignore beside this file):
#   DOCKER_BUILDKIT=1 docker build -f compose/docker/gateway.Dockerfile -t conduit/gateway:0.1.0 .

# ---- builder: a wheel for Conduit and one for each dependency -------------------------
FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY engines/ engines/
COPY telemetry/ telemetry/
# The `upstream` extra: aiohttp, and httpx + h2 (--upstream-http2), for upstream engines run from this
# image (compose/upstream.yml).
RUN pip wheel --wheel-dir /wheels ".[upstream]"

# ---- runtime: exactly those wheels, in a clean virtual environment ---------------------
FROM python:3.11.14-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/conduit \
    PATH=/opt/conduit/bin:$PATH \
    CONDUIT_HOST=0.0.0.0 \
    CONDUIT_PORT=8000
# The wheels are bind-mounted from the builder, so they never land in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/conduit \
    && pip install --no-index /wheels/*.whl \
    && groupadd --system --gid 10001 conduit \
    && useradd --system --uid 10001 --gid conduit --home-dir /home/conduit --create-home conduit \
    && install -d -o conduit -g conduit /var/lib/conduit/images
USER 10001:10001
WORKDIR /home/conduit
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CONDUIT_PORT', '8000') + '/health', timeout=2)"]
# `conduit gateway` by default; other subcommands replace the CMD, e.g.
#   docker compose run --rm --no-deps -T gateway keys hash-admin < credential.txt
ENTRYPOINT ["conduit"]
CMD ["gateway"]
