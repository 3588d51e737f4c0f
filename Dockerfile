# Kiln's container image (docs/OPERATIONS.md, "Container image").
#
#   docker build -t kiln:0.1.0 .                                # CPU
#   docker build --build-arg VARIANT=gpu -t kiln:0.1.0-gpu .    # + CUDA runtime and cuBLAS
#   docker run --rm -p 50051:50051 -p 9464:9464 \
#     -v "$PWD/models:/models:ro" -v "$PWD/deploy/bricks:/bricks" kiln:0.1.0
#
# Stages: `build` compiles on Debian 12 with the packages scripts/setup.sh
# installs (the same script CI runs) and installs into /opt/kiln; the runtime
# stage is Debian 12 slim with only the shared libraries `kiln` links (the
# deploy tests check the list against `ldd` of an installed build). The gpu
# variant builds the CUDA plugin with the toolkit of CUDA_IMAGE and adds that
# toolkit's cuBLAS; the CUDA runtime is linked into the plugin, and the driver
# comes from the host (NVIDIA Container Toolkit).
#
# Ports: 50051 gRPC (Kiln, grpc.health.v1, reflection), 9464 Prometheus
# /metrics. The HEALTHCHECK asks 127.0.0.1:50051: a command that moves
# --port must override the health check too. BrickAdmin (50052) listens on loopback unless --admin_host and
# --admin_token_file say otherwise. Volumes: /models (the base model folder,
# read-only), /bricks (the brick store). Runs as uid/gid 10001 (kiln).

ARG VARIANT=cpu
ARG DEBIAN_IMAGE=debian:12-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu22.04

# The CUDA toolkit, for the gpu variant only: `cuda-${VARIANT}` picks either
# the toolkit image or an empty /usr/local/cuda, so a CPU build never pulls
# the toolkit.
FROM ${CUDA_IMAGE} AS cuda-gpu
FROM ${DEBIAN_IMAGE} AS cuda-cpu
RUN mkdir -p /usr/local/cuda/lib64
# hadolint ignore=DL3006
FROM cuda-${VARIANT} AS cuda

# ---------------------------------------------------------------- build
FROM ${DEBIAN_IMAGE} AS build
ARG VARIANT
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# The build's Debian packages, from the script CI and scripts/run.sh use
# (--no-model: the model is a volume, not part of the image).
COPY scripts/setup.sh scripts/setup.sh
RUN scripts/setup.sh --no-model && rm -rf /var/lib/apt/lists/*
COPY --from=cuda /usr/local/cuda /usr/local/cuda
COPY . .
RUN cuda=OFF; if [[ "${VARIANT}" == gpu ]]; then cuda=ON; fi; \
    cmake -S . -B /tmp/build -DCMAKE_BUILD_TYPE=Release -DKILN_CUDA="${cuda}" \
      -DKILN_BUILD_TESTS=OFF -DKILN_BUILD_BENCH=OFF \
    && cmake --build /tmp/build -j"$(nproc)" \
    && cmake --install /tmp/build --prefix /opt/kiln --strip \
    && /opt/kiln/bin/kiln version

# ---------------------------------------------------------------- runtime
FROM ${DEBIAN_IMAGE} AS runtime-base
# The Debian packages owning every shared library `ldd /opt/kiln/bin/kiln`
# lists, less those in the base image (libc6, libgcc-s1, libstdc++6, zlib1g):
# tests/deploy/test_docker.py keeps this list honest. Not pinned (DL3008):
# Debian 12's archive replaces versions with security updates, so a pin
# would break the build the day it moves.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
      libabsl20220623 libc-ares2 libcivetweb1 libgfortran5 libgomp1 \
      libgrpc++1.51 libgrpc29 libopenblas0-openmp libprometheus-cpp-core1.0 \
      libprometheus-cpp-pull1.0 libprotobuf32 libquadmath0 libre2-9 libssl3 \
      libutf8proc2 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 kiln \
    && useradd --system --uid 10001 --gid kiln --home-dir /nonexistent \
      --no-create-home --shell /usr/sbin/nologin kiln \
    && mkdir -p /models /bricks \
    && chown kiln:kiln /bricks

FROM runtime-base AS runtime-cpu
COPY --from=build /opt/kiln /opt/kiln

FROM runtime-base AS runtime-gpu
COPY --from=build /opt/kiln /opt/kiln
# cuBLAS (and cuBLASLt, which it loads) from the toolkit the plugin was built
# with: the fully versioned files only (COPY would turn the soname symlinks
# into second copies); ldconfig makes the libcublas.so.<major> links the
# plugin dlopens.
COPY --from=cuda /usr/local/cuda/lib64/libcublas.so.*.*.* /usr/local/cuda/lib64/libcublasLt.so.*.*.* /usr/local/cuda/lib64/
RUN echo /usr/local/cuda/lib64 > /etc/ld.so.conf.d/kiln-cuda.conf && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

# hadolint ignore=DL3006
FROM runtime-${VARIANT}
LABEL org.opencontainers.image.title="kiln" \
      org.opencontainers.image.description="gRPC serving for configurable foundation models"
USER 10001:10001
EXPOSE 50051 9464
VOLUME ["/models", "/bricks"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/kiln/bin/kiln", "health", "--addr=127.0.0.1:50051", "--timeout_s=3"]
ENTRYPOINT ["/opt/kiln/bin/kiln"]
CMD ["serve", "--model=/models/all-MiniLM-L6-v2", "--brick_dir=/bricks", "--host=0.0.0.0"]
