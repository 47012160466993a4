# CPU image of the AdaMTL inference service. Mount a checkpoint at /app/checkpoints.
# PYTHON_IMAGE and TORCH_INDEX_URL point the build at a mirror where Docker Hub or the
# PyTorch wheel index cannot be reached; docs/service.md shows how.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch from the CPU wheel index: the default wheel bundles CUDA libraries of several GB.
# The versions match the pins in pyproject.toml, so the install below keeps these wheels.
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        torch==2.14.1 torchvision==0.29.1

# Dependencies first, with empty packages, so code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir model_core service \
    && touch model_core/__init__.py service/__init__.py \
    && pip install . \
    && pip uninstall --yes adamtl \
    && rm -r model_core service

COPY model_core ./model_core
COPY service ./service
RUN pip install --no-deps .

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin adamtl \
    && mkdir -p /app/checkpoints \
    && chown adamtl /app/checkpoints
USER adamtl

ENV ADAMTL_HOST=0.0.0.0 \
    ADAMTL_PORT=8000 \
    ADAMTL_CHECKPOINT=/app/checkpoints/demo.safetensors
EXPOSE 8000

# Healthy once the model is loaded and warmed up; unhealthy again while draining.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['ADAMTL_PORT']}/readyz\", timeout=2)"]

# Exec form, so python is PID 1 and receives SIGTERM to drain.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
