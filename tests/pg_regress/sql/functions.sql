-- The SQL functions, as a user meets them.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
-- The keys come from the server's environment (ENCRYPTION_KEY, ENCRYPTION_KEY_PREVIOUS,
-- GATEWAY_API_KEY_HASH_SECRET); the settings display them, never their values.
SELECT provider_keys_encrypt_fingerprint();
SHOW provider_keys_encrypt.encryption_key;
SHOW provider_keys_encrypt.previous_keys;
SHOW provider_keys_encrypt.gateway_api_key_hash_secret;
SELECT * FROM provider_keys_encrypt_keys();

-- encrypt_token: a fresh nonce every call, so two tokens of one key differ
SELECT encrypt_token('sk-proj-abc') <> encrypt_token('sk-proj-abc') AS differ,
       length(encrypt_token('sk-proj-abc')) AS token_length;
SELECT decrypt_token(encrypt_token('sk-proj-abc'));
SELECT decrypt_token(encrypt_token(''));
SELECT decrypt_token(encrypt_token('ключ-🔑-clé'));

-- is_encrypted_token: verify (default) vs the key-less shape check
SELECT v AS value, is_encrypted_token(v) AS verified, is_encrypted_token(v, verify => false) AS shape_only
FROM (VALUES ('sk-proj-abc123'),
             ('0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'),
             ('AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'),
             ('')) AS t(v);
SELECT is_encrypted_token(encrypt_token('x'));

-- NULL in, NULL out
SELECT encrypt_token(NULL) IS NULL AS e, decrypt_token(NULL) IS NULL AS d, is_encrypted_token(NULL) IS NULL AS i;

-- A token written by the gateway's Node code (tests/interop/make_vectors.mjs) under a key
-- the server does not have does not authenticate here:
SELECT is_encrypted_token('AQIDBAUGBwgJCgsMjvZ1vunxh6s/ZRUrnJRca3aBd6We+5qrLcAAdiIg');
SELECT decrypt_token('AQIDBAUGBwgJCgsMjvZ1vunxh6s/ZRUrnJRca3aBd6We+5qrLcAAdiIg');
-- one the gateway wrote under the key in ENCRYPTION_KEY_PREVIOUS does:
SELECT decrypt_token('yv1hQ6j0Tymgub7DCft5DOqzXFI23JscBLVL+ASjVWHWRsyK6ID27m5uH/noWY/8/TBD');

-- Errors: each its own SQLSTATE, no value echoed
SELECT decrypt_token('sk-proj-not-a-token');
SELECT sqlstate_of($$SELECT decrypt_token('sk-proj-not-a-token')$$);
SELECT sqlstate_of($$SELECT decrypt_token('c2hvcnQ=')$$);
SELECT sqlstate_of($$SELECT decrypt_token('0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef')$$);
SELECT sqlstate_of($$SELECT encrypt_token(repeat('x', 65537))$$);   -- plaintext over 64 KiB
SELECT length(encrypt_token(repeat('x', 65536))) AS max_token_length;
SELECT sqlstate_of($$SELECT decrypt_token(repeat('A', 87424))$$);   -- longer than any token

-- The settings cannot be set, by any path, to anything: keys come only from the environment.
-- (PostgreSQL logs a failed statement's text, key included: never type a key in SQL.)
SET provider_keys_encrypt.encryption_key = 'sk-this-is-not-a-key';
SELECT sqlstate_of($$SET LOCAL provider_keys_encrypt.previous_keys = 'c2hvcnQ='$$);
SELECT sqlstate_of($$SELECT set_config('provider_keys_encrypt.gateway_api_key_hash_secret', 'x', false)$$);
ALTER ROLE CURRENT_USER SET provider_keys_encrypt.encryption_key = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=';
CREATE FUNCTION f_with_key() RETURNS int LANGUAGE sql SET provider_keys_encrypt.previous_keys = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=' AS 'SELECT 1';
ALTER SYSTEM SET provider_keys_encrypt.encryption_key = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=';

-- The settings are absent from pg_settings (so no boot_val/reset_val can leak)
SELECT count(*) FROM pg_settings WHERE name LIKE 'provider_keys_encrypt%';

-- A pooler's reset (DISCARD ALL, RESET ALL) leaves the environment's key working, revealing
-- nothing: there is no session key to survive it.
DISCARD ALL;
RESET ALL;
SHOW provider_keys_encrypt.encryption_key;
SELECT decrypt_token(encrypt_token('after a reset'));
