# docker/Dockerfile's steps, without a container runtime (none is reachable here): sourced by
# scripts/system-check for debian12-pg15, whose helpers (make_root, in_root, psql_in, check, …)
# it uses. In a fresh Debian 12 root (the suite of the image's default base; Debian's own
# postgresql-15 stands in for the image's PostgreSQL, which comes from apt.postgresql.org):
#   - the Dockerfile's COPY and RUN instructions, read from the file (ARG defaults, PG_MAJOR=15)
#   - what the image's entrypoint does: initdb into /var/lib/postgresql/data as postgres (from
#     the sample configuration the RUN step edited), then CMD, as postgres, with the keys as
#     Docker secrets: ENCRYPTION_KEY_FILE=/run/secrets/encryption_key, likewise the gateway's
#   - CREATE EXTENSION, CALL, Node reads the tokens; a secret mounted readable by others is
#     refused (what a compose secret from a 0644 host file looks like)
# Not run: `docker build` itself, the official image's docker-entrypoint.sh, PGDG's package.
# shellcheck shell=bash

# The Dockerfile as "INSTRUCTION args" lines: comments dropped, continuations joined, ARG
# defaults and the given overrides substituted for ${NAME} and $NAME.
dockerfile_steps() { # FILE NAME=VALUE...
  python3 - "$@" <<'PY'
import re, sys
path, overrides = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
text = re.sub(r"\\\n", " ", "\n".join(l for l in open(path).read().splitlines() if not l.lstrip().startswith("#")))
args = {}
for line in text.splitlines():
    line = line.strip()
    if not line:
        continue
    op, _, rest = line.partition(" ")
    if op == "ARG":
        name, _, default = rest.partition("=")
        args[name] = overrides.get(name, args.get(name, default))
        continue
    rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), rest)
    print(op, rest)
PY
}

docker_steps() {
  local steps op rest cmd secrets=/run/secrets data=/var/lib/postgresql/data bin=/usr/lib/postgresql/$M/bin out
  make_root
  cp "$NEW_DEB" "$R/root/pkg/"
  steps=$(dockerfile_steps docker/Dockerfile "PG_MAJOR=$M" "PKE_VERSION=$VERSION") \
    || { bad "docker/Dockerfile could not be read"; return; }
  check "Dockerfile: FROM postgres:\${PG_MAJOR}-bookworm (the suite of this root)" grep -qx "FROM postgres:$M-bookworm" <<<"$steps"
  while read -r op rest; do
    case $op in
      COPY)
        # COPY <file in the build context (target/debian)> <dest>
        read -r src dest <<<"$rest"
        check "Dockerfile COPY $src $dest" cp "$(dirname "$NEW_DEB")/$src" "$R$dest" ;;
      RUN)
        check "Dockerfile RUN step (apt-get update; apt-get install the .deb; the preload line in the sample configuration)" \
          docker_run_step "$rest" ;;
      CMD) cmd=$rest ;;
    esac
  done <<<"$steps"
  check "  ... the package is installed" test "$(chroot "$R" dpkg-query -W -f='${Status}' "$PACKAGE")" = "install ok installed"
  # CMD ["postgres", "-c", "..."] as words
  mapfile -t cmd < <(python3 -c 'import json, sys; print("\n".join(json.loads(sys.argv[1])))' "$cmd")
  check "Dockerfile CMD runs postgres with the library preloaded" test "${cmd[0]}:${cmd[*]}" = "postgres:postgres -c shared_preload_libraries=$EXT"

  # The entrypoint's initdb, as the image runs it: as postgres, into PGDATA.
  chroot "$R" install -d -o postgres -g postgres -m 700 "$data" /run/postgresql
  check "initdb (the entrypoint's) copies the preload line from the sample configuration" docker_initdb

  # The secrets as compose mounts them from files of mode 600 owned by 999 (postgres).
  mkdir -p "$R$secrets"
  printf '%s\n' "$KEY" >"$R$secrets/encryption_key"
  printf '%s\n' "$SECRET" >"$R$secrets/gateway_api_key_hash_secret"
  chroot "$R" chown postgres:postgres $secrets/encryption_key $secrets/gateway_api_key_hash_secret
  chmod 600 "$R$secrets"/*
  check "CMD with ENCRYPTION_KEY_FILE and GATEWAY_API_KEY_HASH_SECRET_FILE (Docker secrets): the server starts" docker_start "${cmd[@]:1}"
  check "  ... the key is ENCRYPTION_KEY_FILE's, with the gateway's fingerprint" test \
    "$(psql_in postgres -c 'SHOW provider_keys_encrypt.encryption_key')" = \
    "from ENCRYPTION_KEY_FILE ($secrets/encryption_key), fingerprint $(ENCRYPTION_KEY=$KEY node tests/interop/gateway.mjs fingerprint)"
  psql_in postgres -c "CREATE DATABASE gateway" >/dev/null
  psql_in gateway -c "CREATE SCHEMA pke" -c "CREATE EXTENSION $EXT SCHEMA pke" >/dev/null
  psql_in gateway -c "$SAMPLE" >/dev/null
  check "  ... CALL pke.encrypt_provider_keys() in the image's server" call_encrypts gateway
  check "  ... every active token reads back (SQL and the gateway's Node code)" tokens_read gateway
  check "  ... format => 'llmgw' with the keyring from GATEWAY_API_KEY_HASH_SECRET_FILE, read by the gateway's code" llmgw_backfill gateway

  # A secret others can read (compose mounts a 0644 host file as 0644): refused, content unseen.
  docker_stop
  chmod 644 "$R$secrets/encryption_key"
  check "a secret file others can read: the server starts, every base64 function refuses it (F0000), the log warns" docker_start "${cmd[@]:1}"
  out=$(psql_in gateway -v VERBOSITY=verbose -c "SELECT pke.decrypt_token(token) FROM provider_key LIMIT 1" 2>&1) || true
  check "  ... F0000, naming the file and its mode, not its content" \
    contains_not "$out" "F0000: ENCRYPTION_KEY_FILE names $secrets/encryption_key, which other users can access (mode 0644)"
  check "  ... the log names the file, never the key" \
    contains_not "$(cat "$R/var/lib/postgresql/server.log")" "WARNING:  provider_keys_encrypt: ENCRYPTION_KEY_FILE names $secrets/encryption_key"
  docker_stop
}

docker_initdb() {
  chroot "$R" runuser -u postgres -- "/usr/lib/postgresql/$M/bin/initdb" -D /var/lib/postgresql/data --auth=trust -U postgres >/dev/null \
    && grep -qx "shared_preload_libraries = '$EXT'" "$R/var/lib/postgresql/data/postgresql.conf"
}
# contains_not TEXT WANTED: TEXT has WANTED and none of the secrets
contains_not() {
  grep -qF -- "$2" <<<"$1" || { echo "expected '$2' in: $1" >&2; return 1; }
  ! grep -qF -e "$KEY" -e "${SECRET%%,*}" -e "${SECRET##*,}" <<<"$1"
}

docker_run_step() {
  in_root "$1" >"$DIR/docker-run.log" 2>&1 || { tail -20 "$DIR/docker-run.log" >&2; return 1; }
}

# CMD's arguments, run as the image runs them: as postgres, PGDATA set, the secrets' variables in
# the environment (and no key variable itself).
docker_start() {
  unshare -n sh -c 'ip link set lo up && exec chroot "$1" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/postgresql/'"$M"'/bin \
    PGDATA=/var/lib/postgresql/data ENCRYPTION_KEY_FILE=/run/secrets/encryption_key \
    GATEWAY_API_KEY_HASH_SECRET_FILE=/run/secrets/gateway_api_key_hash_secret \
    runuser -u postgres -- pg_ctl -D /var/lib/postgresql/data -l /var/lib/postgresql/server.log -w -o "$2" start' \
    sh "$R" "$*" >/dev/null
}
docker_stop() {
  chroot "$R" runuser -u postgres -- "/usr/lib/postgresql/$M/bin/pg_ctl" -D /var/lib/postgresql/data -m fast -w stop >/dev/null
}
