# Fermion serving image: the gateway and the ONNX Runtime executor, no export toolchain.
# Build:  docker build -t fermion:0.1.0 .
# Run:    docker run -p 8000:8000 -v "$PWD/model_store:/models:ro" fermion:0.1.0
# (The GPU image with TensorRT is described in README, "GPU image".)

FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/fermion
COPY pyproject.toml README.md ./
COPY serving ./serving
COPY model_store ./model_store
COPY compilers ./compilers
COPY loadtest ./loadtest
# Only the serving dependencies: torch and onnx stay out of the image.
RUN /opt/fermion/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /srv fermion \
    && mkdir -p /models && chown fermion /models
COPY --from=build /opt/fermion /opt/fermion
ENV PATH=/opt/fermion/bin:$PATH PYTHONUNBUFFERED=1
USER fermion
WORKDIR /srv
EXPOSE 8000
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"
ENTRYPOINT ["fermion"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--store", "/models"]
