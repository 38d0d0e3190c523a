#!/usr/bin/env bash
# Everything `make demo` and `make test` need on the machine before the first cargo build, in one
# place (both scripts call this first). Idempotent: every tool is checked by running it, so a
# machine that has everything finishes in well under a second and changes nothing; apt-get update
# runs only when something has to be installed. Not root and something missing: it says what and
# how to install it, and fails.
#
#   Debian packages  protobuf-compiler (tonic's protoc), build-essential (cc/make for the bundled
#                    librdkafka, zstd and ring), pkg-config + libssl-dev (rdkafka's OpenSSL),
#                    postgresql-client (psql, used by the demo and the local stack)
#   Rust components  rustfmt, clippy
set -euo pipefail
log() { printf '[prerequisites] %s\n' "$*"; }
die() { printf '[prerequisites] error: %s\n' "$*" >&2; exit 1; }
quiet() { "$@" >/dev/null 2>&1; }
started=$(date +%s%N)

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

log "all present ($((($(date +%s%N) - started) / 1000000)) ms)"
