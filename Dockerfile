# celery_nb with JupyterLab and Flower: the image of the worker, jupyterlab and flower services.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
WORKDIR /opt/celery_nb
COPY pyproject.toml README.md ./
COPY celery_nb ./celery_nb
COPY celery_nb_runtime ./celery_nb_runtime
RUN pip install --no-cache-dir '.[stack]'
