# Fermion serving images: the gateway with backend ray and no export toolchain (onnx, the
# compile side): models are built elsewhere (`fermion build`) and mounted read-only as a
# model store. Two targets of one file, so that both share every step but the base:
#
#   docker build --target gpu -t fermion:0.1.0-gpu .   # CUDA runtime + torch (cu128) + TensorRT
#   docker build --target cpu -t fermion:0.1.0-cpu .   # python:3.11-slim + torch (CPU build)
#
# Run:    docker run --gpus all -p 8000:8000 -p 8001:8001 -v "$PWD/model_store:/models:ro" fermion:0.1.0-gpu
#         (FERMION_PORT=9000 moves the HTTP port; the HEALTHCHECK follows it; 8001 is gRPC)
# Ray:    the same image runs `ray start` for the KubeRay head and workers (deploy/kubernetes).
#
# Dependencies are installed from pyproject.toml alone, before the sources are copied: a
# code change rebuilds only the last, small layer, never the multi-GB torch/TensorRT one.
# TensorRT's wheels come from NVIDIA's package index; torch's from PyTorch's. An engine runs
# only on the TensorRT release that built it: build engines with the TENSORRT_VERSION this
# image installs (the version is in each artifact's options).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ----------------------------------------------------------------------- GPU build
FROM ${CUDA_IMAGE} AS gpu-build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TENSORRT_VERSION=10.8.0.43
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The distribution's python3 of the pinned CUDA_IMAGE release; apt has no stable pins for it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/fermion
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
# torch first, from PyTorch's CUDA index, so that nothing pulls the CPU build instead.
RUN /opt/fermion/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && /opt/fermion/bin/python3 deploy/docker/requirements.py ray fleet tensorrt > /tmp/requirements.txt \
    && /opt/fermion/bin/pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com \
        -r /tmp/requirements.txt "tensorrt==${TENSORRT_VERSION}"
COPY README.md ./
COPY serving ./serving
COPY model_store ./model_store
COPY compilers ./compilers
COPY loadtest ./loadtest
RUN /opt/fermion/bin/pip install --no-cache-dir --no-deps .

# ----------------------------------------------------------------------- CPU build
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv /opt/fermion
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
RUN /opt/fermion/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && /opt/fermion/bin/python3 deploy/docker/requirements.py ray fleet > /tmp/requirements.txt \
    && /opt/fermion/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY serving ./serving
COPY model_store ./model_store
COPY compilers ./compilers
COPY loadtest ./loadtest
RUN /opt/fermion/bin/pip install --no-cache-dir --no-deps .

# ----------------------------------------------------------------------- CPU image
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --home-dir /srv fermion \
    && mkdir -p /models /srv && chown fermion /models /srv
COPY --from=cpu-build /opt/fermion /opt/fermion
ENV PATH=/opt/fermion/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
WORKDIR /srv
EXPOSE 8000 8001
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os,sys,urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('FERMION_PORT', '8000'), timeout=2).status != 200)"]
# exec form: fermion is PID 1 and receives SIGTERM itself (drain, then exit).
ENTRYPOINT ["fermion"]
CMD ["serve", "--host", "0.0.0.0", "--store", "/models"]

# ----------------------------------------------------------------------- GPU image (default)
FROM ${CUDA_IMAGE} AS gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /srv fermion \
    && mkdir -p /models /srv && chown fermion /models /srv
COPY --from=gpu-build /opt/fermion /opt/fermion
ENV PATH=/opt/fermion/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
WORKDIR /srv
EXPOSE 8000 8001
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os,sys,urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('FERMION_PORT', '8000'), timeout=2).status != 200)"]
ENTRYPOINT ["fermion"]
CMD ["serve", "--host", "0.0.0.0", "--store", "/models"]
