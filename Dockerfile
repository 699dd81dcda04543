# The backend image, which also runs the orchestrator (compose.yaml). The base is a build argument so the
# image can be built from a local base too:
#   docker build -t lsbackend .                       (python:3.11-slim)
#   docker build --build-arg BASE_IMAGE=localhost/my-python:3.11 -t lsbackend .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    MODEL_DIR=/data/model_dir \
    MLFLOW_TRACKING_URI=sqlite:////data/mlflow.db \
    HOST=0.0.0.0 \
    PORT=9090

WORKDIR /app
COPY requirements.txt .
# A virtual environment: works on the slim image and on a distribution's Python (PEP 668) alike. A private
# package index's pip.conf comes in as a build secret, never in a layer:
#   docker build --secret id=pipconf,src=$HOME/.config/pip/pip.conf .
RUN --mount=type=secret,id=pipconf,target=/run/secrets/pipconf \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    python3 -m venv /opt/venv && pip install --upgrade pip && pip install -r requirements.txt

COPY backend/ backend/
COPY hooks/ hooks/
COPY lsmlflow/ lsmlflow/
COPY orchestrator/ orchestrator/
COPY model.py wsgi.py gunicorn.conf.py ./

# Listening on 0.0.0.0 inside the container: /configure then requires CONFIGURE_TOKEN or basic auth.
RUN useradd --create-home --uid 10001 backend && mkdir -p /data && chown backend /data
USER backend
VOLUME ["/data"]
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=2s --start-period=20s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/livez', timeout=1)"
CMD ["gunicorn", "wsgi:app"]
