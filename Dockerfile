# syntax=docker/dockerfile:1
# maelab for the GPU deployment (pipelines/prefect.yaml, rmae-retrain) and any torchrun job.
#   docker build -t maelab:gpu --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .
#   docker run --gpus all -v /data/maelab:/opt/maelab/data maelab:gpu kedro run --pipelines=pretrain_mae --env=coco
# The PyPI torch wheel bundles CUDA and cuDNN; the host needs only the NVIDIA driver and container toolkit.
# data/ and mlruns/ are mounted (or MLFLOW_TRACKING_URI points at a server); they are never in the image.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# dependencies first (a layer that changes only with pyproject.toml), then the package itself
COPY pyproject.toml README.md ./
RUN mkdir -p src/maelab && touch src/maelab/__init__.py \
    && pip install pip==24.3.1 setuptools==75.6.0 wheel==0.45.1 \
    && pip install . \
    && pip uninstall -y maelab
COPY src ./src
RUN pip install --no-deps .

FROM python:${PYTHON_VERSION}-slim-bookworm
ARG GIT_COMMIT=""
# git: MLflow's source tags; tini: signals (SIGTERM on pre-emption) reach torchrun and the workers.
# Debian's stable point releases carry only security fixes: these two are left to the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 maelab
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/maelab
COPY --chown=maelab:maelab pyproject.toml Makefile dvc.yaml params.yaml ./
COPY --chown=maelab:maelab conf ./conf
COPY --chown=maelab:maelab pipelines ./pipelines
# src/: Kedro's bootstrap wants the project's source_dir (maelab itself is installed in /opt/venv)
RUN mkdir -p data mlruns conf/local src && chown -R maelab:maelab data mlruns conf/local
ENV PATH=/opt/venv/bin:$PATH \
    MAELAB_PROJECT_ROOT=/opt/maelab \
    MAELAB_GIT_COMMIT=${GIT_COMMIT} \
    KEDRO_DISABLE_TELEMETRY=1 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHONUNBUFFERED=1
USER 1000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["maelab", "--help"]
