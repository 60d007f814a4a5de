# GPU worker image: `docker run --gpus all IMAGE worker --storage URL --study NAME`.
# The vllm extra brings vLLM and the CUDA build of torch it is pinned to.
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/mergesearch
COPY pyproject.toml README.md ./
COPY mergesearch ./mergesearch
COPY merging ./merging
COPY evaluators ./evaluators
COPY storage ./storage
COPY search ./search
# DL3013 wants pinned pip names; this installs the project itself, whose pyproject pins.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[vllm]" \
    && useradd --create-home --uid 1000 worker

USER 1000
WORKDIR /home/worker
ENTRYPOINT ["mergesearch"]
CMD ["--help"]
