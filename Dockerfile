# Serving image: `tracktower serve` for the registered champion of an MLflow tracking store.
#
#   docker build -t tracktower .
#   docker run -p 8000:8000 -v "$PWD/mlflow.db:/mlflow/mlflow.db" \
#       -v "$PWD/mlruns:$PWD/mlruns" tracktower
#
# The sqlite store records absolute artifact paths, so mount the artifact root at the same path it
# has on the host (or point MLFLOW_TRACKING_URI at a tracking server instead).
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

ENV MLFLOW_TRACKING_URI=sqlite:////mlflow/mlflow.db
VOLUME /mlflow
USER tracktower
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

CMD ["tracktower", "serve", "--model", "models:/tracktower@champion", "--host", "0.0.0.0", "--port", "8000"]
