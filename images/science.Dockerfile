# An image with numpy, pandas, matplotlib and tqdm, for the data-science example and the rich-output tests.
# Real users: docker build -t celery-nb/science -f images/science.Dockerfile images
# (default base python:3.12-slim, whose own Python gets them from pip); images/build.sh builds
# it on local/py311-numpy, whose Debian python3 gets Debian's packages (numpy 1.24, pandas 1.5,
# matplotlib 3.6; python3-munkres stands in for scipy, which matplotlib's fonttools would pull in).
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
RUN if command -v pip >/dev/null 2>&1; then \
        pip install --no-cache-dir numpy pandas matplotlib tqdm; \
    else \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3-numpy python3-tqdm python3-pandas python3-matplotlib python3-munkres \
        && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi
