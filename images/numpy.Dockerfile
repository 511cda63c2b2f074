# An image with numpy and tqdm, for examples and tests that need them.
# Real users: docker build -t celery-nb/numpy -f images/numpy.Dockerfile images
# (default base python:3.12-slim); the tests build it on a local Debian base.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
RUN if command -v pip >/dev/null 2>&1; then \
        pip install --no-cache-dir numpy tqdm; \
    else \
        apt-get update && apt-get install -y --no-install-recommends python3-numpy python3-tqdm \
        && rm -rf /var/lib/apt/lists/*; \
    fi
