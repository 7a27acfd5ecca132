# capwatch-agent image. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t capwatch-agent .
# The runtime is distroless (glibc, no shell), running as uid 65532. On a
# GPU node the NVIDIA container runtime mounts libnvidia-ml.so.1 into it.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p capwatch-agent \
    && cp target/release/capwatch-agent /capwatch-agent

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /capwatch-agent /usr/local/bin/capwatch-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/capwatch-agent"]
