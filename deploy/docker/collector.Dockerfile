# capwatch-collector image. Build from the repository root:
#   docker build -f deploy/docker/collector.Dockerfile -t capwatch-collector .
# The runtime is Debian slim rather than distroless so that a shell can
# send the collector SIGHUP to reload its tenants:
#   kubectl -n capwatch exec deploy/capwatch-collector -- sh -c 'kill -HUP 1'
# It runs as uid 65532 and keeps its ledger in /var/lib/capwatch.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p capwatch-collector \
    && cp target/release/capwatch-collector /capwatch-collector

FROM debian:bookworm-slim
RUN groupadd --system --gid 65532 capwatch \
    && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/capwatch \
        --shell /usr/sbin/nologin capwatch \
    && install -d -o 65532 -g 65532 -m 0750 /var/lib/capwatch
COPY --from=build /capwatch-collector /usr/local/bin/capwatch-collector
USER 65532:65532
WORKDIR /var/lib/capwatch
ENV CAPWATCH_LEDGER=/var/lib/capwatch/ledger.db
EXPOSE 7070 9470
ENTRYPOINT ["/usr/local/bin/capwatch-collector"]
