# syntax=docker/dockerfile:1
# Build: the same toolchain and system packages CI uses (scripts/test.sh installs them there).
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin audit-consumer

# Runtime: librdkafka links OpenSSL and zlib dynamically, which rules out distroless/cc;
# a slim Debian with just those libraries and an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin audit
COPY --from=build /src/target/release/audit-consumer /usr/local/bin/audit-consumer
COPY migrations /app/migrations
COPY config/default.toml /app/config/default.toml
USER 10001:10001
WORKDIR /app
ENV AUDIT_CONFIG_FILE=/app/config/default.toml LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/audit-consumer"]
CMD ["run"]
