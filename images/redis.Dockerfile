# local/redis: a local stand-in for redis:7 (no image registry on the test machines): Debian's
# redis-server (7.0) and redis-cli, run as compose.yaml runs the official image.
ARG BASE_IMAGE=local/py311
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server > /dev/null \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /data
CMD ["redis-server"]
