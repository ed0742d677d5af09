# postgres:17-alpine (musl) plus provider_keys_encrypt, preloaded: the gateway's own database
# image, so its existing alpine-made volume keeps working (no collation change, no REINDEX).
#
#   scripts/package --pg 17 && scripts/musl/build   # target/alpine/provider-keys-encrypt-<version>-pg17-alpine-x86_64.tar.gz
#   docker build -f docker/alpine.Dockerfile -t provider-keys-encrypt-postgres:17-alpine target/alpine
#
# The tarball's files are at this image's paths (/usr/local/lib/postgresql,
# /usr/local/share/postgresql/extension). The library needs libgcc_s.so.1 (Rust's unwinding,
# which pgrx uses to turn a panic into an ERROR): Alpine's libgcc package. Keys as in
# docker/Dockerfile: ENCRYPTION_KEY / ENCRYPTION_KEY_FILE, GATEWAY_API_KEY_HASH_SECRET(_FILE), …
# (the extension reads <VAR>_FILE itself; the file must be owned by postgres, uid 70 here, or
# root, and not readable by others).
#
# Not built here: no container runtime or registry is reachable. scripts/test loads the same
# tarball into a musl PostgreSQL 17 at these paths and runs the suites there (docs/install.md, "Alpine images").
ARG PKE_VERSION=0.2.2
FROM postgres:17-alpine
ARG PKE_VERSION
ADD provider-keys-encrypt-${PKE_VERSION}-pg17-alpine-x86_64.tar.gz /
RUN set -eux; \
    apk add --no-cache libgcc; \
    echo "shared_preload_libraries = 'provider_keys_encrypt'" >>/usr/local/share/postgresql/postgresql.conf.sample
CMD ["postgres", "-c", "shared_preload_libraries=provider_keys_encrypt"]
