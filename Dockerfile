# tracktower image: serves the registered champion of an MLflow store by default; the same image
# trains into that store.
#
#   docker build -t tracktower .
#   docker run --rm -v "$PWD/mlflow:/mlflow" -v "$PWD/data:/data:ro" tracktower \
#       tracktower train --config /app/configs/default.yaml \
#       --interactions /data/interactions.parquet --tracks /data/tracks.parquet
#   docker run --rm -p 8000:8000 -v "$PWD/mlflow:/mlflow" --env-file tracktower.env tracktower
#
# Serving binds 0.0.0.0 inside the container, so by default it requires API keys:
# tracktower.env holds TRACKTOWER_API_KEYS=<key>[,<key>…] (an env file keeps the key out of the
# shell history). Without keys the container exits at once with a one-line error (exit 2), unless
# TRACKTOWER_ALLOW_UNAUTHENTICATED=true says that something in front of it authenticates. The
# health check uses /healthz, which needs no key.
#
# The store (mlflow.db and, beside it, mlruns/ with the artifacts) lives in the /mlflow volume: the
# working directory is /mlflow, where a sqlite store puts its artifact root, so the absolute
# artifact paths it records are the same in every container that mounts the volume there.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true

RUN groupadd --system tracktower \
    && useradd --system --gid tracktower --create-home --home-dir /home/tracktower tracktower \
    && mkdir /mlflow && chown tracktower:tracktower /mlflow

WORKDIR /app
# Only what the wheel needs: a code change does not invalidate more layers than necessary.
COPY pyproject.toml README.md ./
COPY features/ features/
COPY training/ training/
COPY serving/ serving/
COPY configs/ configs/
# Non-editable: the image holds an installed package, not a link to /app.
RUN pip install --no-cache-dir . \
    && tracktower --help >/dev/null

ENV MLFLOW_TRACKING_URI=sqlite:////mlflow/mlflow.db \
    TRACKTOWER_CHECKPOINT_DIR=/mlflow/checkpoints \
    TRACKTOWER_MODEL_CACHE_DIR=/mlflow/model-cache
VOLUME /mlflow
WORKDIR /mlflow
USER tracktower
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

CMD ["tracktower", "serve", "--model", "models:/tracktower@champion", "--host", "0.0.0.0", "--port", "8000"]
