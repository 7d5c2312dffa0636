# Fermion GPU serving image: the gateway with the ONNX Runtime, torch (CUDA) and TensorRT
# executors on an NVIDIA CUDA runtime base. No export toolchain (onnx, the compile side):
# models are built elsewhere (`fermion build`) and mounted read-only as a model store.
#
# Build:  docker build -t fermion:0.1.0-gpu .
# Run:    docker run --gpus all -p 8000:8000 -p 8001:8001 -v "$PWD/model_store:/models:ro" fermion:0.1.0-gpu
# CPU:    the same image runs without --gpus; it then serves the CPU artifacts
#         (each replica picks the artifact that fits its host, see README "GPU targets").
#
# TensorRT's wheels come from NVIDIA's package index; torch's CUDA wheels from PyTorch's.
# An engine runs only on the TensorRT release that built it: build engines with the
# TENSORRT_VERSION this image installs (the version is in each artifact's options).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TENSORRT_VERSION=10.8.0.43
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/fermion
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving ./serving
COPY model_store ./model_store
COPY compilers ./compilers
COPY loadtest ./loadtest
# torch first, from PyTorch's CUDA index, so that nothing pulls the CPU build instead.
RUN /opt/fermion/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && /opt/fermion/bin/pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com \
        ".[tensorrt]" "tensorrt==${TENSORRT_VERSION}"

FROM ${CUDA_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /srv fermion \
    && mkdir -p /models /srv && chown fermion /models /srv
COPY --from=build /opt/fermion /opt/fermion
ENV PATH=/opt/fermion/bin:$PATH PYTHONUNBUFFERED=1
USER fermion
WORKDIR /srv
EXPOSE 8000 8001
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"
ENTRYPOINT ["fermion"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--store", "/models"]
