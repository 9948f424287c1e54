# syntax=docker/dockerfile:1
# kubemr-async base image: the `kubemr` CLI (operator, worker, run) in a virtualenv.
# Job images build FROM it and add their job modules (see examples/Dockerfile).
#
#   docker build -t kubemr-async:0.1.0 .
#
# Base images are pinned to a Python minor and Debian release; pin a digest too
# (--build-arg BASE_IMAGE=python:3.11-slim-trixie@sha256:...) for reproducible builds.
# Any Debian-like image with Python 3.11+, venv and CA certificates works: CI builds on a
# local Debian root filesystem (hack/ensure-container-tools.sh), whose Python has no
# `python`/`pip` commands, hence `python3 -m venv` and the venv's own pip below.
ARG BASE_IMAGE=python:3.11-slim-trixie

# --- builder: wheels for the package and every dependency, installed into /opt/venv ---
FROM ${BASE_IMAGE} AS builder

# A compiler for any dependency without a wheel for this platform; the final image has none.
# Versions are not pinned: the base image tag fixes the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/venv
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the checkout out).
# Wheels for the dependencies first, in a layer of their own: a change to the code alone
# reuses it instead of downloading and building them all again.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' >requirements.txt \
    && /opt/venv/bin/pip wheel --wheel-dir /wheels -r requirements.txt \
    && /opt/venv/bin/pip install --no-index --find-links /wheels -r requirements.txt
COPY README.md ./
COPY kubemr_async ./kubemr_async
# The project's wheel, then an install from the wheels only (the dependencies are there
# already): what is installed is exactly what was built here.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-index --find-links /wheels kubemr-async \
    && /opt/venv/bin/kubemr version

# --- final image: the runtime and the virtualenv, nothing else ---
FROM ${BASE_IMAGE}

# ARGs before the first FROM are only visible in a stage that declares them again.
ARG BASE_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kubemr-async" \
      org.opencontainers.image.description="Kubernetes-native, masterless MapReduce for Python with asyncio callbacks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 kubemr \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin kubemr

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001

ENTRYPOINT ["kubemr"]
CMD ["--help"]
