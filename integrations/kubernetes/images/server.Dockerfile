# The kvtier server image (StatefulSet kvtier).  Build from the repository root:
#   docker build -f integrations/kubernetes/images/server.Dockerfile -t REGISTRY/kvtier:0.1.0 .
# TORCH: a CPU-only torch build keeps the image small (the server never uses a GPU); point
# PIP_EXTRA_INDEX_URL at an index that serves one, or leave it for the default build.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN pip wheel --no-deps -w /wheels /src

FROM python:3.11-slim
ARG PIP_EXTRA_INDEX_URL=""
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/kvtier-*.whl)[remote,metrics]" && rm -rf /wheels
RUN useradd --uid 10001 --user-group --no-create-home kvtier
USER 10001
EXPOSE 5555 9090
ENTRYPOINT []
CMD ["kvtier", "serve", "--help"]
