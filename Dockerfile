# syntax=docker/dockerfile:1
#
# The sheath container image: a release build on Debian bookworm, copied
# into a distroless runtime (glibc, CA certificates, no shell, no package
# manager) that runs as an unprivileged user.
#
#   docker build -t sheath:0.1.0 .
#
# The cache mounts below need BuildKit, the default builder since Docker 23.

# The newest stable Rust on bookworm. Pin it (e.g. RUST_VERSION=1.85) for
# reproducible builds; 1.85 is the oldest version sheath supports.
ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Only the manifest and the sources take part in the build, so edits to
# docs, examples or tests never invalidate this step. The crates.io index,
# the downloaded crates and target/ live in cache mounts that survive
# between builds: a rebuild after a source change recompiles sheath alone,
# not its dependencies. target/ is a cache, so the binary is copied out of
# it in the same step.
RUN --mount=type=bind,source=Cargo.toml,target=Cargo.toml \
    --mount=type=bind,source=Cargo.lock,target=Cargo.lock \
    --mount=type=bind,source=src,target=src \
    --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git/db,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin sheath \
    && install -D -m 0755 target/release/sheath /out/usr/local/bin/sheath
# The state directory, created here because the runtime image has no shell
# to create it. 0700: it holds the local CA's key and ACME account keys.
RUN install -d -m 0700 /out/var/lib/sheath

# glibc (the binary links it dynamically), the Mozilla CA bundle for ACME
# servers with public certificates, /etc/passwd with the nonroot user.
# There is no /bin/sh: an export hook (`on_renew`, run with `sh -c`) needs
# a base image with a shell, such as debian:bookworm-slim.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/sheath /usr/local/bin/sheath
# Owned by the runtime user so that a new named volume mounted here, which
# Docker initialises from the image, is writable by sheath too.
COPY --from=build --chown=65532:65532 /out/var/lib/sheath /var/lib/sheath

# The default state directory becomes $XDG_STATE_HOME/sheath =
# /var/lib/sheath. This is used instead of SHEATH_STATE_DIR because that
# variable, like --state-dir, overrides the state_dir of a config file;
# this way a config file's state_dir still wins, and SHEATH_STATE_DIR still
# overrides both.
ENV XDG_STATE_HOME=/var/lib
# The local CA, the ACME account and the last issued certificates. Without
# a volume every new container would have a new CA and a new ACME account.
VOLUME ["/var/lib/sheath"]

# distroless' nonroot user, by number so that Kubernetes' runAsNonRoot can
# verify it without looking up /etc/passwd.
USER 65532:65532

# The conventional TLS port of the flag-only sidecar (SHEATH_LISTEN).
EXPOSE 8443

# Ready means every listener is bound and has a valid certificate; the check
# asks the admin endpoint on 127.0.0.1:9190 (SHEATH_ADMIN moves it, and the
# healthcheck follows). An ACME listener is not ready until its first
# certificate is issued, which the start period leaves time for.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/sheath", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/sheath"]
# `run` takes its settings from SHEATH_* variables (SHEATH_LISTEN,
# SHEATH_UPSTREAM, …) or from a file named by SHEATH_CONFIG, so the usual
# deployment only sets environment variables.
CMD ["run"]
