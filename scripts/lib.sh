# Shared by scripts/demo, scripts/test and bench/run: paths, and `ensure_toolchain`, which
# installs whatever is missing (and skips what is present) on a fresh Debian 12 machine.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_MAJOR=15
PG_BIN=/usr/lib/postgresql/$PG_MAJOR/bin
PGRX_VERSION=0.18.1
# Everything PostgreSQL touches lives under /tmp: the server runs as the unprivileged
# `postgres` user and may not be able to enter the checkout (e.g. under /root).
WORK=${PKE_WORK:-/tmp/provider_keys_encrypt}
export PGRX_HOME=$WORK/pgrx-home
WRAP=$WORK/pgbin
export USER=${USER:-$(id -un)}
export PATH=$HOME/.cargo/bin:$PATH

log() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

APT_PACKAGES=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-contrib
  libclang-dev clang pkg-config build-essential ca-certificates)

ensure_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  # Debian starts a cluster of its own on install; we never use it.
  if [ -d /etc/postgresql/$PG_MAJOR/main ] && command -v pg_ctlcluster >/dev/null 2>&1; then
    as_root pg_ctlcluster $PG_MAJOR main stop >/dev/null 2>&1 || true
  fi
}

ensure_cargo_pgrx() {
  command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
  if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
    log "installing cargo-pgrx $PGRX_VERSION (about 8 minutes, once)"
    cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked
  fi
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy || true
}

# PostgreSQL refuses to run as root. pgrx starts initdb/pg_ctl from `pg_config --bindir`, so
# we give it a bin directory whose initdb and pg_ctl re-run themselves as `postgres` when
# invoked by root, and whose pg_config reports that directory.
ensure_wrappers() {
  mkdir -p "$WRAP"
  for f in "$PG_BIN"/*; do
    ln -sf "$f" "$WRAP/$(basename "$f")"
  done
  rm -f "$WRAP/initdb" "$WRAP/pg_ctl" "$WRAP/pg_config"
  cat >"$WRAP/initdb" <<WRAPPER
#!/bin/sh
# -E UTF8: the extension requires a UTF8 database (pgrx falls back to --locale=C without C.UTF-8)
if [ "\$(id -u)" = 0 ]; then exec runuser -u postgres -- $PG_BIN/initdb -U root -E UTF8 "\$@"; fi
exec $PG_BIN/initdb -E UTF8 "\$@"
WRAPPER
  cat >"$WRAP/pg_ctl" <<WRAPPER
#!/bin/sh
if [ "\$(id -u)" = 0 ]; then exec runuser -u postgres -- $PG_BIN/pg_ctl "\$@"; fi
exec $PG_BIN/pg_ctl "\$@"
WRAPPER
  cat >"$WRAP/pg_config" <<WRAPPER
#!/bin/sh
if [ "\$1" = "--bindir" ] && [ \$# -eq 1 ]; then echo "$WRAP"; exit 0; fi
exec /usr/bin/pg_config "\$@"
WRAPPER
  chmod 755 "$WRAP/initdb" "$WRAP/pg_ctl" "$WRAP/pg_config"
}

ensure_pgrx_init() {
  if ! grep -q "$WRAP/pg_config" "$PGRX_HOME/config.toml" 2>/dev/null; then
    log "cargo pgrx init --pg$PG_MAJOR (PGRX_HOME=$PGRX_HOME)"
    mkdir -p "$PGRX_HOME"
    cargo pgrx init --pg$PG_MAJOR "$WRAP/pg_config" >/dev/null
  fi
  if [ "$(id -u)" = 0 ]; then
    chmod 755 "$WORK"
    chown -R postgres:postgres "$PGRX_HOME"
  fi
}

ensure_toolchain() {
  ensure_packages
  ensure_cargo_pgrx
  mkdir -p "$WORK"
  ensure_wrappers
  ensure_pgrx_init
}

# A fresh base64 32-byte key from the OS CSPRNG (the same as `openssl rand -base64 32`).
generate_key() { head -c 32 /dev/urandom | base64; }
