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
#
# Layers are cut so that a change to the code alone rebuilds only what holds the code: the
# virtualenv of dependencies (~400 MB) is built from the dependency list alone and copied
# into the final image as one layer that stays cached; the project is a wheel installed
# with --no-deps in a thin layer on top of it.
ARG BASE_IMAGE=python:3.11-slim-trixie

# --- requirements: the dependency lists out of pyproject.toml, nothing else ---
# Any edit to pyproject.toml reruns this small stage; the stages below that COPY its
# output are keyed on the lists' content, so only a change to the dependencies (or the
# build backend) rebuilds them.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
print(*p["project"]["dependencies"], sep="\n", file=open("/requirements.txt", "w")); \
print(*p["build-system"]["requires"], sep="\n", file=open("/build-requirements.txt", "w"))'

# --- dependencies: /opt/venv with every runtime dependency and not the project ---
FROM ${BASE_IMAGE} AS dependencies

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
COPY --from=requirements /requirements.txt /tmp/
# The exact versions every dependency is built at (scripts/lock writes them; CI tests them).
COPY constraints.txt /tmp/
# Wheels first, then an install from those wheels only: what is installed is exactly what
# was built here.
RUN /opt/venv/bin/pip wheel --wheel-dir /tmp/wheels -r /tmp/requirements.txt \
        -c /tmp/constraints.txt \
    && /opt/venv/bin/pip install --no-index --find-links /tmp/wheels -r /tmp/requirements.txt \
    && rm -rf /tmp/wheels

# --- project: the kubemr-async wheel, built from the code alone ---
FROM ${BASE_IMAGE} AS project

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The build backend in a layer of its own, so a code change builds the wheel offline.
RUN python3 -m venv /opt/build
COPY --from=requirements /build-requirements.txt /tmp/
RUN /opt/build/bin/pip install -r /tmp/build-requirements.txt
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the checkout out).
COPY pyproject.toml README.md ./
COPY kubemr_async ./kubemr_async
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --- final image: the runtime, the dependencies' virtualenv and the project, nothing else ---
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

# The big layer: it stays cached (and pulled) as long as the dependency list is unchanged.
COPY --from=dependencies /opt/venv /opt/venv
# The thin layers: the project's wheel (~0.2 MB, left in its COPY layer: buildah does not
# key a RUN's cache on a `--mount=from=` stage, so a bind mount could install a stale one)
# and its install beside the dependencies, from that wheel only.
COPY --from=project /wheels/ /tmp/wheels/
RUN pip install --no-deps --no-index --no-cache-dir --disable-pip-version-check \
        --root-user-action=ignore /tmp/wheels/kubemr_async-*.whl \
    && rm -rf /tmp/wheels \
    && kubemr version
WORKDIR /app
USER 10001:10001

ENTRYPOINT ["kubemr"]
CMD ["--help"]
