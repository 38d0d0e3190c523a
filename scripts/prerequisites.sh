#!/usr/bin/env bash
# Everything `make demo` and `make test` need on the machine before the first cargo build, in one
# place (both scripts call this first). Idempotent: every tool is checked by running it, so a
# machine that has everything finishes in well under a second and changes nothing; apt-get update
# runs only when something has to be installed. Not root and something missing: it says what and
# how to install it, and fails.
#
#   Debian packages  protobuf-compiler (tonic's protoc), build-essential (cc/make for the bundled
#                    librdkafka, zstd and ring), pkg-config + libssl-dev (rdkafka's OpenSSL),
#                    postgresql-client (psql, used by the demo and the local stack), git (the
#                    advisory database snapshot of the cargo deny step), curl + jq (the local
#                    identity provider's admin script and the demo's API calls)
#   Rust components  rustfmt, clippy
#   cargo-deny       pinned, built once into ~/.cache/audit-consumer/bin (CI caches that directory)
set -euo pipefail
log() { printf '[prerequisites] %s\n' "$*"; }
die() { printf '[prerequisites] error: %s\n' "$*" >&2; exit 1; }
quiet() { "$@" >/dev/null 2>&1; }
started=$(date +%s%N)

# Kept in step with scripts/test.sh, which puts $cache/bin first on PATH for `cargo deny`.
cache=$HOME/.cache/audit-consumer
cargo_deny_version=0.20.2

# A C compiler that finds libc's headers and links a program: what the -sys build scripts need.
cc_works() {
  local out
  out=$(mktemp) || return 1
  printf '#include <stdio.h>\nint main(void) { return puts("") < 0; }\n' | quiet cc -x c - -o "$out"
  local rc=$?
  rm -f "$out"
  return $rc
}

missing_packages() {
  local need=()
  quiet protoc --version || need+=(protobuf-compiler)
  { cc_works && quiet c++ --version && quiet make --version; } || need+=(build-essential)
  quiet pkg-config --version || need+=(pkg-config)
  # openssl-sys finds OpenSSL through pkg-config; the .pc file comes with libssl-dev.
  quiet pkg-config --exists openssl || need+=(libssl-dev)
  quiet psql --version || need+=(postgresql-client)
  quiet git --version || need+=(git)
  quiet curl --version || need+=(curl)
  quiet jq --version || need+=(jq)
  echo "${need[*]}"
}

read -ra need <<<"$(missing_packages)"
if ((${#need[@]})); then
  if ((EUID != 0)); then
    die "missing ${need[*]}; run this script as root, or install them yourself:
  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${need[*]}"
  fi
  quiet command -v apt-get || die "missing ${need[*]} and there is no apt-get here (Debian/Ubuntu expected); install them by hand"
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  read -ra still <<<"$(missing_packages)"
  ((${#still[@]} == 0)) || die "still missing after apt-get install: ${still[*]}"
fi

quiet cargo --version || die "cargo is missing; install the Rust toolchain with rustup (https://rustup.rs)"
if ! quiet cargo fmt --version || ! quiet cargo clippy --version; then
  quiet command -v rustup || die "cargo fmt / cargo clippy are missing and there is no rustup to add them"
  log "adding the rustfmt and clippy components"
  rustup component add rustfmt clippy
  { quiet cargo fmt --version && quiet cargo clippy --version; } \
    || die "cargo fmt / cargo clippy still do not run after rustup component add"
fi

# cargo-deny: built from source, pinned, outside the clone so every later run (and CI with the
# cache restored) reuses the binary. It has no optional features left to trim (0.19.1 replaced
# gix with the git CLI), so the build is made cheaper through its profile instead: the crate
# ships lto = "fat" and codegen-units = 1, the slowest way to compile it, for a checker that
# runs for a second. The environment overrides the manifest's profile.
deny=$cache/bin/cargo-deny
if [[ $("$deny" --version 2>/dev/null) != "cargo-deny $cargo_deny_version" ]]; then
  log "installing cargo-deny $cargo_deny_version into $cache/bin (compiles once; a few minutes on 2 cores)"
  t0=$(date +%s)
  # CARGO_TARGET_DIR may point at this project's build cache (.ci/run): keep the tool out of it.
  env -u CARGO_TARGET_DIR \
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo install --locked --force --root "$cache" cargo-deny --version "$cargo_deny_version"
  [[ $("$deny" --version 2>/dev/null) == "cargo-deny $cargo_deny_version" ]] \
    || die "cargo-deny $cargo_deny_version was installed but $deny --version does not say so"
  log "cargo-deny $cargo_deny_version installed in $(($(date +%s) - t0))s"
fi

log "all present ($((($(date +%s%N) - started) / 1000000)) ms)"
