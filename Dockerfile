# celery_nb with JupyterLab and Flower: the image of compose.yaml's worker, jupyterlab and flower.
#   docker build -t celery-nb .
# BASE_IMAGE: any Debian-like image with python3 (3.10+, venv module); images/build.sh builds
# this on local/py311-pip where no registry is reachable.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/celery_nb
# The dependencies first, from pyproject.toml alone: a change to the sources reinstalls only celery_nb.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
print("\n".join([*p["build-system"]["requires"], *p["project"]["dependencies"], \
*p["project"]["optional-dependencies"]["stack"]]))' > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY celery_nb ./celery_nb
COPY celery_nb_runtime ./celery_nb_runtime
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf build
