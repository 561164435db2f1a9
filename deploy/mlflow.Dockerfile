# The MLflow tracking server of compose.yaml: MLflow itself, the PostgreSQL driver of its backend
# store and boto3 for its S3 artifact store (MinIO). No TensorFlow, no tracktower: the server
# stores runs and files, it never loads a model.
#
# mlflow and psycopg2-binary are pinned to the versions in pyproject.toml (tests check that they
# agree): the client that trains and the server that stores must speak the same MLflow.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true

RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.8 \
    && useradd --system --create-home --home-dir /home/mlflow mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4).status != 200)"]

ENTRYPOINT ["mlflow", "server"]
