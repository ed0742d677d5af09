# Shared definitions for scripts/setup, scripts/test, scripts/demo, scripts/package,
# scripts/package-check and bench/run: versions, paths, ports and small helpers. Sourcing it
# changes nothing on the machine; scripts/setup installs what is missing.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXT=provider_keys_encrypt
PGRX_VERSION=0.18.1

# The PostgreSQL majors: 15 is Debian 12's own (copied), 16-18 come from pinned PyPI wheels
# (scripts/majors.sh: versions, hashes, layout). PKE_PG_MAJOR is the one major that scripts/demo,
# scripts/package, scripts/package-check and bench/run work on (default 15; the last three take
# --pg N); scripts/test runs every major, or those PKE_PG names (e.g. PKE_PG=17).
source "$ROOT/scripts/majors.sh"
export PKE_PG_MAJOR=${PKE_PG_MAJOR:-15}
# The key every test server gets through its environment, like production (tests only, never a
# real key). The single definition: tests/integration/cluster.mjs reads it from the environment.
export PKE_TEST_KEY=dGVzdC1rZXktcHJvdmlkZXJfa2V5c19lbmNyeXB0LTE=
# The keys the #[pg_test] and pg_regress servers start with (src/pg_tests.rs and tests/pg_regress
# expect these); integration clusters get their own.
PKE_TEST_KEY_PREVIOUS=cHJldmlvdXMta2V5LXByb3ZpZGVyX2tleXNfZW5jcnk=
PKE_TEST_GATEWAY_SECRET=test-gateway-secret-2,test-gateway-secret-1

# Everything PostgreSQL touches lives under the work directory: the server runs as the
# unprivileged `postgres` user and may not be able to enter the checkout (e.g. under /root).
# Two checkouts that test at the same time need two work directories (PKE_WORK).
WORK=${PKE_WORK:-/tmp/provider_keys_encrypt}
export PKE_WORK=$WORK
export PGRX_HOME=$WORK/pgrx-home
export USER=${USER:-$(id -un)}
export PATH=$HOME/.cargo/bin:$PATH

# Ports. pgrx's own server (`cargo pgrx regress`, `start`) listens on TCP at base port + major:
# 28900 + 15 = 28915 here, not pgrx's default 28815, so a checkout with pgrx's defaults can run
# beside this one. (`cargo pgrx test` picks a free ephemeral port by itself.) Integration
# clusters listen only on a Unix socket in their own directory under $WORK, so equal port
# numbers in two work directories do not collide; PKE_PORT_OFFSET shifts them anyway.
PKE_PGRX_BASE_PORT=${PKE_PGRX_BASE_PORT:-28900}
PKE_PGRX_BASE_TESTING_PORT=${PKE_PGRX_BASE_TESTING_PORT:-32300}
export PKE_PORT_OFFSET=${PKE_PORT_OFFSET:-0}

# Debian's PostgreSQL: the system's installation. Only the demo installs into it; tests copy it.
sys_pg_bindir() { echo "/usr/lib/postgresql/$1/bin"; }

# The private installation of a major, where tests, regress, integration clusters and the
# benchmark install into and run from:
#   15:     a copy of Debian's files under $WORK/pg15/root, laid out as Debian lays them out
#           (usr/lib/postgresql/15, usr/share/postgresql/15, usr/include/postgresql/15)
#   16..18: the unpacked wheel under $WORK/pgN/wheel (majors.sh: major_root is its installation)
# Either way PostgreSQL's relocatable paths (pg_config, postgres, initdb) resolve inside it.
pg_root() { if major_is_wheel "$1"; then echo "$WORK/pg$1/wheel"; else echo "$WORK/pg$1/root"; fi; }
pg_bindir() {
  if major_is_wheel "$1"; then echo "$(major_root "$1")/bin"; else echo "$(pg_root "$1")/usr/lib/postgresql/$1/bin"; fi
}
# pgrx's view of it: initdb/pg_ctl wrappers that run as `postgres` when we are root, and a
# pg_config that reports this directory as --bindir (scripts/setup writes them).
pg_wrapdir() { echo "$WORK/pg$1/wrap"; }
# Work on major $1 from here on. The one place that says which PostgreSQL a script, the
# integration tests (tests/integration/cluster.mjs reads PKE_PG_BIN) and the benchmark use.
use_major() {
  export PKE_PG_MAJOR=$1
  WRAP=$(pg_wrapdir "$1")
  export PKE_PG_BIN
  PKE_PG_BIN=$(pg_bindir "$1")
}
use_major "$PKE_PG_MAJOR"
# `--pg N` among a script's arguments: use_major N, and leave the other arguments in ARGS.
take_pg_option() {
  ARGS=()
  while [ $# -gt 0 ]; do
    case $1 in
      --pg) [ $# -ge 2 ] || { echo "--pg needs a major (${PKE_ALL_MAJORS[*]})" >&2; exit 2; }; use_major "$2"; shift 2 ;;
      --pg=*) use_major "${1#--pg=}"; shift ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
  case " ${PKE_ALL_MAJORS[*]} " in *" $PKE_PG_MAJOR "*) ;; *)
    echo "PostgreSQL $PKE_PG_MAJOR is not one of the majors this checkout builds (${PKE_ALL_MAJORS[*]})" >&2; exit 2 ;;
  esac
}

# Copy Debian's PostgreSQL $1 into the private root $2, leaving out every file of this extension
# (whatever a demo or an older checkout installed there). Server headers included: pgrx's
# bindgen reads them from `pg_config --includedir-server`, which now points into the copy.
copy_debian_pg() {
  local m=$1 dest=$2
  mkdir -p "$dest"
  tar -C / --exclude="*$EXT*" -cf - usr/lib/postgresql/"$m" usr/share/postgresql/"$m" \
    usr/include/postgresql/"$m"/server | tar -C "$dest" -xf -
}

# The private installation of major $1 laid out at Debian's paths under $2, without any file of
# this extension: what a server with Debian's postgresql-$1 package looks like, for
# scripts/package-check. 15 is Debian's own copy. A wheel major is rearranged: its programs go to
# usr/lib/postgresql/N/bin, its libraries to usr/lib/postgresql/N/lib, its share files to
# usr/share/postgresql/N, and symbolic links at the wheel's relative places (e.g. lib/postgresql)
# lead the relocatable programs there; the wheel's bundled libraries (*.libs) go where the
# programs' RPATH ($ORIGIN/../../../pgserver.libs) looks.
debian_layout_pg() {
  local m=$1 dest=$2
  if ! major_is_wheel "$m"; then copy_debian_pg "$m" "$dest"; return; fi
  local src pgc bin lib share rel_lib rel_share d
  src=$(major_root "$m"); pgc=$src/bin/pg_config
  bin=$dest/usr/lib/postgresql/$m/bin; lib=$dest/usr/lib/postgresql/$m/lib; share=$dest/usr/share/postgresql/$m
  rel_lib=$(realpath -m --relative-to="$src/bin" "$("$pgc" --pkglibdir)")
  rel_share=$(realpath -m --relative-to="$src/bin" "$("$pgc" --sharedir)")
  mkdir -p "$bin" "$lib" "$share"
  tar -C "$src/bin" -cf - . | tar -C "$bin" -xf -
  tar -C "$("$pgc" --pkglibdir)" --exclude="*$EXT*" -cf - . | tar -C "$lib" -xf -
  tar -C "$("$pgc" --sharedir)" --exclude="*$EXT*" -cf - . | tar -C "$share" -xf -
  for d in "$(pg_root "$m")"/*.libs; do [ -d "$d" ] && cp -r "$d" "$dest/usr/lib/"; done
  if [ "$(realpath -m "$bin/$rel_lib")" != "$lib" ]; then
    mkdir -p "$(dirname "$bin/$rel_lib")"
    ln -sfn "$(realpath -m --relative-to="$(dirname "$bin/$rel_lib")" "$lib")" "$bin/$rel_lib"
  fi
  mkdir -p "$(dirname "$bin/$rel_share")"
  ln -sfn "$(realpath -m --relative-to="$(dirname "$bin/$rel_share")" "$share")" "$bin/$rel_share"
  # the rearranged programs must find those files, or the check would test nothing
  [ "$(realpath "$("$bin/pg_config" --pkglibdir)")" = "$lib" ] && [ "$(realpath "$("$bin/pg_config" --sharedir)")" = "$share" ] \
    || { echo "pg$m at Debian's paths: pg_config reports $("$bin/pg_config" --pkglibdir) and $("$bin/pg_config" --sharedir)" >&2; return 1; }
}

log() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# Copy the hand-written scripts sql/provider_keys_encrypt--*.sql (frozen install scripts of
# earlier versions, upgrade scripts) into an extension directory. pgrx generates only the
# current version's install script. No scripts yet: nothing to copy.
copy_sql_scripts() {   # EXTDIR [CHECKOUT, default this one]
  local extdir=$1 src=${2:-$ROOT} f run=()
  [ -w "$extdir" ] || run=(sudo)
  for f in "$src"/sql/"$EXT"--*.sql; do
    [ -e "$f" ] || continue
    "${run[@]}" install -m 644 "$f" "$extdir/"
  done
}

# `cargo pgrx install` into the installation a pg_config reports, plus the sql/ scripts.
# Extra arguments go to cargo pgrx (e.g. --release). Its output goes to $WORK/install.log.
install_extension() {
  local pg_config=$1; shift
  local extdir pkglibdir sudo_flag=()
  extdir="$("$pg_config" --sharedir)/extension"
  pkglibdir=$("$pg_config" --pkglibdir)
  { [ -w "$extdir" ] && [ -w "$pkglibdir" ]; } || sudo_flag=(--sudo)
  cargo pgrx install "$@" "${sudo_flag[@]}" --pg-config "$pg_config" >"$WORK/install.log" 2>&1 \
    || { tail -30 "$WORK/install.log"; return 1; }
  copy_sql_scripts "$extdir"
}

# Which build a shared library is: "release" or "debug" (debug builds carry .debug_info).
build_kind() { if readelf -S "$1" | grep -q '\.debug_info'; then echo debug; else echo release; fi; }

# One line per file of this extension under the given directories (sha256, size, mtime and ctime
# in nanoseconds, path), sorted: two listings differ when a file was added, removed, modified or
# rewritten, even with the same bytes.
ext_file_listing() {
  local d
  for d in "$@"; do
    [ -d "$d" ] || continue
    find "$d" -path "*$EXT*" ! -type d -print0 | while IFS= read -r -d '' f; do
      printf '%s %s\n' "$(sha256sum <"$f" | cut -c1-64)" "$(stat -c '%s %.9Y %.9Z %n' "$f")"
    done
  done | sort -k5
}

# The system's extension directories: what /usr/bin/pg_config and each Debian major report.
system_ext_dirs() {
  local pgc
  for pgc in /usr/bin/pg_config /usr/lib/postgresql/*/bin/pg_config; do
    [ -x "$pgc" ] || continue
    "$pgc" --pkglibdir
    echo "$("$pgc" --sharedir)/extension"
  done 2>/dev/null | sort -u
}
# The listing of this extension's files in the system's PostgreSQL.
system_ext_listing() {
  local dirs
  mapfile -t dirs < <(system_ext_dirs)
  ext_file_listing "${dirs[@]}"
}

# The previous release: scripts/system-check installs its package first and upgrades it to this
# checkout's (built from that commit with scripts/package --source).
PKE_PREVIOUS_RELEASE=0.2.1
PKE_PREVIOUS_RELEASE_COMMIT=c6936c308160a8a0daa51ef48446cf4340b38fcb

# What a chroot'ed PostgreSQL needs in a throwaway root: /proc, the host's /dev, and a /dev/shm of
# its own (a bind of /dev alone lacks it: shared memory segments fail). What is mounted stays.
mount_root_fs() {
  mountpoint -q "$1/proc" || mount -t proc proc "$1/proc"
  mountpoint -q "$1/dev" || mount --bind /dev "$1/dev"
  mountpoint -q "$1/dev/shm" || mount -t tmpfs -o mode=1777 shm "$1/dev/shm"
}
# Unmount everything mounted under a root, deepest first.
unmount_root_fs() {
  local r m
  r=$(realpath -m "$1")
  for m in $(awk -v r="$r" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}

# Remove a throwaway root file system (scripts/system-check, scripts/musl/build). First unmount
# everything mounted under it: a run that was killed can leave its /proc and /dev mounts, and
# `rm -rf` through a bind mount of /dev deletes the host's device nodes. Refuses while anything is
# still mounted there, and never leaves the root's own file system (--one-file-system).
remove_root() {
  local r
  r=$(realpath -m "$1")
  [ -e "$r" ] || return 0
  [ "$r" != / ] || { echo "remove_root: refusing /" >&2; return 1; }
  unmount_root_fs "$r"
  if awk -v r="$r" '$2 == r || index($2, r "/") == 1 {f = 1} END {exit !f}' /proc/mounts; then
    echo "remove_root: $r still has file systems mounted; not removing it" >&2
    return 1
  fi
  rm -rf --one-file-system "$r"
}

# A fresh base64 32-byte key from the OS CSPRNG (the same as `openssl rand -base64 32`).
generate_key() { head -c 32 /dev/urandom | base64; }

# For callers that predate scripts/setup (tests/adversarial-long): the same thing.
ensure_toolchain() { "$ROOT/scripts/setup"; }
