-- Who can do what. Superusers aside, nobody reads the key, not even pg_monitor members.
-- privileges_1.out is the same session on PostgreSQL 16 and later, which word the refusal to
-- examine a superuser-only setting differently: 'permission denied to examine "..."' plus a
-- DETAIL line, where 15 says 'must be superuser or have privileges of pg_read_all_settings ...'.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = warning;
DROP ROLE IF EXISTS app_rw;
DROP ROLE IF EXISTS gateway;
DROP ROLE IF EXISTS monitor;
DROP ROLE IF EXISTS key_owner;
SET client_min_messages = notice;
CREATE ROLE app_rw LOGIN;
CREATE ROLE gateway LOGIN;
CREATE ROLE monitor LOGIN IN ROLE pg_monitor;
CREATE ROLE key_owner LOGIN;
CREATE TABLE pk_priv (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO pk_priv VALUES ('p1', 'sk-priv-1', 'openai');
GRANT SELECT, UPDATE ON pk_priv TO app_rw;
GRANT SELECT ON pk_priv TO gateway;
GRANT EXECUTE ON FUNCTION decrypt_token(text) TO gateway;

-- The library is preloaded (required): its settings exist in every session from the start
SELECT provider_keys_encrypt_fingerprint();

-- pg_monitor (so pg_read_all_settings) sees the fingerprint, never the key
SET ROLE monitor;
SHOW provider_keys_encrypt.encryption_key;
SELECT current_setting('provider_keys_encrypt.encryption_key');
SELECT current_setting('provider_keys_encrypt.gateway_api_key_hash_secret');
SELECT count(*) FROM pg_settings WHERE name LIKE 'provider_keys_encrypt%';
SELECT count(*) FROM pg_file_settings;
SET provider_keys_encrypt.encryption_key = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=';
SELECT decrypt_token(encrypt_token('x'));
RESET ROLE;

-- a plain role can't even look, can encrypt and run the migration on a table it may update,
-- but can't decrypt or roll back
SET ROLE app_rw;
SHOW provider_keys_encrypt.encryption_key;
SELECT current_setting('provider_keys_encrypt.previous_keys');
SET provider_keys_encrypt.previous_keys = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=';
SELECT is_encrypted_token(encrypt_token('x')) AS can_encrypt;
SELECT decrypt_token(encrypt_token('x'));
CALL encrypt_provider_keys('pk_priv', verbose => false);
CALL decrypt_provider_keys('pk_priv');
RESET ROLE;

-- the gateway role, granted EXECUTE on decrypt_token, reads plaintext; it may not write
SET ROLE gateway;
SELECT id, decrypt_token(token) FROM pk_priv;
CALL encrypt_provider_keys('pk_priv');
RESET ROLE;

-- a table's owner (not a superuser) runs the migration on its own table; no key, no rollback
CREATE TABLE pk_owned (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO pk_owned VALUES ('o1', 'sk-owned-1', 'anthropic');
ALTER TABLE pk_owned OWNER TO key_owner;
SET ROLE key_owner;
SHOW provider_keys_encrypt.encryption_key;
CALL encrypt_provider_keys('pk_owned', verbose => false);
SELECT id, is_encrypted_token(token) FROM pk_owned;
CALL decrypt_provider_keys('pk_owned');
SELECT decrypt_token(token) FROM pk_owned;
RESET ROLE;

-- what PUBLIC may execute: the public surface (internals live in pke_internal)
SELECT p.pronamespace::regnamespace AS schema, p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public_can_execute
FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'provider_keys_encrypt'
WHERE p.pronamespace <> 'pke_internal'::regnamespace
ORDER BY 1, 2;

-- nobody but the extension's owner may create objects where the engine looks
SELECT has_schema_privilege('public', 'pke_internal', 'CREATE') AS public_can_create,
       has_schema_privilege('app_rw', 'pke_internal', 'CREATE') AS app_rw_can_create,
       has_schema_privilege('app_rw', 'pke_internal', 'USAGE') AS app_rw_can_use;

DROP TABLE pk_priv;
DROP TABLE pk_owned;
REVOKE EXECUTE ON FUNCTION decrypt_token(text) FROM gateway;
DROP ROLE app_rw;
DROP ROLE gateway;
DROP ROLE monitor;
DROP ROLE key_owner;
