# An image with numpy and tqdm, for the examples and tests that need them.
# Real users: docker build -t celery-nb/numpy -f images/numpy.Dockerfile images
# (default base python:3.12-slim, whose own Python gets them from pip); images/build.sh builds
# it on local/py311, whose Debian python3 gets Debian's packages.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
RUN if command -v pip >/dev/null 2>&1; then \
        pip install --no-cache-dir numpy tqdm; \
    else \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-numpy python3-tqdm \
        && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi
