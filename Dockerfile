# syntax=docker/dockerfile:1
#
# lb in a container.
#
#   docker build -t lb .                          # the tokio build (default), compiled here
#   docker build -t lb --build-arg BUILD=smol .   # the smol (tiny) build
#   docker build -t lb-mock --target mock .       # mock-backend, for demos (docker-compose.yml)
#
# From binaries already built on the host (tests/run.sh builds them; glibc of Debian 12 or
# older), without the Rust image:
#
#   docker build -t lb --target prebuilt [--build-arg BUILD=smol] .   # target/bin/lb-$BUILD
#   docker build -t lb-mock --target mock-prebuilt .                  # target/release/mock-backend
#
# Run it with the listener and the admin listener on every interface of the container
# (the admin listener's default, 127.0.0.1:9901, is unreachable from outside it):
#
#   docker run -p 8080:8080 -p 9901:9901 lb --admin-bind 0.0.0.0:9901 --backends http://10.0.0.7:8000 ...
#
# Stage order matters for builders that build every stage up to the target: the prebuilt
# stages come before the Rust builder, so `--target prebuilt` never needs rust:1-bookworm.

# tokio (default) or smol: which runtime lb is built with (or, for prebuilt, which
# target/bin/lb-$BUILD is copied).
ARG BUILD=tokio

# ---------------------------------------------------------------------------------------
# The runtime base: Debian 12 slim (glibc, libgcc_s; bash for the health check). Nothing
# here runs a command or needs the network. The user is numeric (65532, distroless's
# "nonroot"), so Kubernetes' runAsNonRoot can verify it without an /etc/passwd entry.
FROM debian:bookworm-slim AS runtime-base
LABEL org.opencontainers.image.licenses="MIT"
# The port the HEALTHCHECK probes: set it too when --admin-bind uses another port.
ENV LB_ADMIN_PORT=9901
USER 65532:65532
WORKDIR /

# lb's image settings, shared by the prebuilt and the compiled image.
FROM runtime-base AS lb-base
LABEL org.opencontainers.image.title="lb" \
      org.opencontainers.image.description="HTTP load balancer for LLM inference fleets"
# 8080: the proxy (--port, default 8080, --bind default 0.0.0.0).
# 9901: the admin listener (/metrics, /health, /live, /admin/*) with --admin-bind 0.0.0.0:9901.
EXPOSE 8080 9901
# Liveness from inside the container on /live, with nothing but bash (bookworm-slim has no
# curl): one HTTP/1.0 GET over bash's /dev/tcp, healthy when the status line says 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${LB_ADMIN_PORT:-9901} && printf 'GET /live HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r -t 2 status <&3 && [[ $status == *' 200 '* ]]"]
# lb handles SIGTERM itself (graceful: in-flight requests get --shutdown-timeout), also as PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lb"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------
# Prebuilt: the host's binaries from the build context (.dockerignore lets exactly these
# through from target/). Used by tests/container.sh. No CA bundle (bookworm-slim has none):
# for https:// backends mount one (-v /etc/ssl/certs:/etc/ssl/certs:ro) or use --backend-ca.
FROM lb-base AS prebuilt
ARG BUILD
COPY target/bin/lb-${BUILD} /usr/local/bin/lb

FROM runtime-base AS mock-prebuilt
COPY target/release/mock-backend /usr/local/bin/mock-backend
EXPOSE 8000
ENTRYPOINT ["mock-backend"]
CMD ["--bind", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------
# The builder: the official Rust image (Debian 12, like the runtime, so the glibc matches).
FROM rust:1-bookworm AS builder
ARG BUILD
WORKDIR /src
# The workspace: its manifest, lock file and member crates (Cargo.toml `members`).
COPY Cargo.toml Cargo.lock ./
COPY core core
COPY http1 http1
COPY proxy proxy
COPY adapters adapters
COPY cli cli
COPY tests tests
# The registry and target/ are cache mounts: a rebuild after a source change recompiles
# only the workspace crates. The binaries are copied out of the cache mount to /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eu; \
    case "$BUILD" in \
      tokio) features="" ;; \
      smol) features="--no-default-features --features smol" ;; \
      *) echo "BUILD must be tokio or smol, not '$BUILD'" >&2; exit 1 ;; \
    esac; \
    cargo build --release --locked -p lb-cli $features; \
    install -D -m 0755 target/release/lb /out/lb; \
    cargo build --release --locked -p lb-tests --bin mock-backend; \
    install -D -m 0755 target/release/mock-backend /out/mock-backend; \
    /out/lb --version

# mock-backend, compiled: the demo's fake vLLM servers (docker-compose.yml).
FROM runtime-base AS mock
COPY --from=builder /out/mock-backend /usr/local/bin/mock-backend
EXPOSE 8000
ENTRYPOINT ["mock-backend"]
CMD ["--bind", "0.0.0.0", "--port", "8000"]

# The default target: lb compiled above, with the builder's CA bundle so https:// backends
# verify against the usual public roots (rustls-native-certs reads /etc/ssl/certs).
FROM lb-base AS runtime
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /out/lb /usr/local/bin/lb
