# memrelay in a container:
#   docker build -t memrelay .
#   docker run -p 11211:11211 memrelay -s 10.0.0.12:11211 -s 10.0.0.13:11211 -b 10.0.0.11:11211
# The servers are named on the command line, on top of the image's
# configuration (packaging/docker/memrelay.toml), or in a file mounted over
# /etc/memrelay/memrelay.toml. docs/operations.md has more.
#
# scripts/container-check builds this image with buildah and runs the
# demo's self-check with the image's memrelay. It is not in CI: the base
# images come from docker.io, which the CI machine cannot reach.

# Build: the whole workspace's lock file, a release build of the binary.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p memrelay --bin memrelay \
    && install -D -m 0755 target/release/memrelay /out/memrelay

# Run: Debian slim (glibc, as the build), the binary, its base
# configuration, and an unprivileged user.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin memrelay
COPY --from=build /out/memrelay /usr/local/bin/memrelay
COPY packaging/docker/memrelay.toml /etc/memrelay/memrelay.toml
USER memrelay:memrelay
# 11211: memcached clients; 9150: /metrics, /healthz, /readyz, on the
# container's loopback unless the configuration says otherwise.
EXPOSE 11211 9150
# /healthz answers 200 while the process serves. bash's /dev/tcp keeps the
# image free of an HTTP client. (/readyz, 503 while some key has no server
# up, is for a load balancer to route by, not a reason to restart.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9150 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
# SIGTERM (docker stop) drains: give `docker stop -t` more than
# timeouts.shutdown (10s by default).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/memrelay", "--config", "/etc/memrelay/memrelay.toml"]
CMD []
