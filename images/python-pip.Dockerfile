# local/py311-pip: a local stand-in for python:3.12-slim (no image registry on the test machines):
# local/py311 with Debian's python3-venv. images/build.sh adds the host's CA bundle to the build
# context as ca-bundle.crt and pip in derived images trusts it (a TLS-intercepting proxy).
ARG BASE_IMAGE=local/py311
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv > /dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY ca-bundle.crt /usr/local/share/ca-bundle.crt
ENV PIP_CERT=/usr/local/share/ca-bundle.crt
