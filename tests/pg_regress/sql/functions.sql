-- The SQL functions, as a user meets them.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
SELECT provider_keys_encrypt_fingerprint();
SHOW provider_keys_encrypt.encryption_key;
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

-- A token written by the gateway's Node code (tests/interop/make_vectors.mjs) under another
-- key does not authenticate here:
SELECT is_encrypted_token('AQIDBAUGBwgJCgsMjvZ1vunxh6s/ZRUrnJRca3aBd6We+5qrLcAAdiIg');
SELECT decrypt_token('AQIDBAUGBwgJCgsMjvZ1vunxh6s/ZRUrnJRca3aBd6We+5qrLcAAdiIg');
-- ... until its key is listed as a previous key:
SET provider_keys_encrypt.previous_keys = 'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=';
SHOW provider_keys_encrypt.previous_keys;
SELECT decrypt_token('AQIDBAUGBwgJCgsMjvZ1vunxh6s/ZRUrnJRca3aBd6We+5qrLcAAdiIg');
RESET provider_keys_encrypt.previous_keys;

-- Errors: each its own SQLSTATE, no value echoed
SELECT decrypt_token('sk-proj-not-a-token');
SELECT sqlstate_of($$SELECT decrypt_token('sk-proj-not-a-token')$$);
SELECT sqlstate_of($$SELECT decrypt_token('c2hvcnQ=')$$);
SELECT sqlstate_of($$SELECT decrypt_token('0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef')$$);
SET provider_keys_encrypt.encryption_key = 'sk-this-is-not-a-key';
SET provider_keys_encrypt.encryption_key = 'AAAA';
SELECT sqlstate_of($$SET provider_keys_encrypt.previous_keys = 'c2hvcnQ='$$);
ALTER ROLE CURRENT_USER SET provider_keys_encrypt.encryption_key = 'dGVzdC1rZXktcHJvdmlkZXJfa2V5c19lbmNyeXB0LTE=';

-- The settings are absent from pg_settings (so no boot_val/reset_val can leak)
SELECT count(*) FROM pg_settings WHERE name LIKE 'provider_keys_encrypt%';
