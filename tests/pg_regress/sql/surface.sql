-- The SQL surface at a glance, for what the other sessions do not show: every routine's labels
-- as declared (volatility, strictness, parallel safety), who may call what, NULL handling, the
-- verified and the shape test on odd values, round trips of every shape, and each SQL path to a
-- key setting with its SQLSTATE (functions.sql shows the messages).
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;

-- Labels (kind f: function, p: procedure; volatility i/s/v; parallel s: safe, u: unsafe): STABLE
-- where a key is read, VOLATILE where a nonce is drawn or a procedure commits, STRICT where NULL
-- in means NULL out (not the llmgw functions: a NULL organization is the managed scope), PARALLEL
-- SAFE wherever a worker can do the same.
SELECT p.pronamespace::regnamespace AS schema, p.proname AS name,
       pg_catalog.pg_get_function_identity_arguments(p.oid) AS args,
       p.prokind AS kind, p.provolatile AS volatility, p.proisstrict AS strict, p.proparallel AS parallel
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
  JOIN pg_extension x ON x.oid = d.refobjid AND x.extname = 'provider_keys_encrypt'
 ORDER BY 1::text, 2, 3;

-- PUBLIC may call what reveals nothing, not what decrypts
SELECT f AS routine, has_function_privilege('public', f, 'EXECUTE') AS public_may
  FROM unnest(ARRAY['encrypt_token(text)', 'decrypt_token(text)', 'is_encrypted_token(text, boolean)',
                    'llmgw_encrypt_token(text, text, text)', 'llmgw_decrypt_token(text, text, text)']) AS f;

-- NULL in, NULL out, for every argument
SELECT is_encrypted_token(NULL, false) IS NULL AS shape_of_null, is_encrypted_token('x', NULL) IS NULL AS verify_null;

-- The verified test never raises on odd input, a megabyte of base64 included
SELECT value, is_encrypted_token(v) AS verified, is_encrypted_token(v, verify => false) AS shape_only
  FROM (VALUES ('====', '===='), ('a tab', E'\t'), ('sk-proj-1', 'sk-proj-1')) AS t(value, v);
SELECT is_encrypted_token(repeat('A', 1000000)) AS a_megabyte_of_base64;

-- Round trips of every shape (10,000 characters included); a token passes both tests
SELECT length(p) AS plaintext_length, decrypt_token(t) = p AS round_trip,
       is_encrypted_token(t) AS verified, is_encrypted_token(t, verify => false) AS shape_only
  FROM (SELECT p, encrypt_token(p) AS t
          FROM (VALUES (''), ('sk-proj-abc'), ('ключ-🔑'),
                       ('0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'),
                       (repeat('x', 10000))) AS v(p)) AS s;

-- Every SQL path to a key setting is refused with 55P02, a valid key or not; a blank value
-- holds nothing and passes; the prefix is reserved (42602)
SELECT split_part(sqlstate_of(q), ':', 1) AS sqlstate, path
  FROM (VALUES
    ('SET, a valid key', $$SET provider_keys_encrypt.encryption_key = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0='$$),
    ('SET, not a key', $$SET provider_keys_encrypt.encryption_key = 'not-a-key'$$),
    ('SET, a gateway secret', $$SET provider_keys_encrypt.gateway_api_key_hash_secret = 'a-gateway-secret'$$),
    ('ALTER ROLE ... SET', $$ALTER ROLE CURRENT_USER SET provider_keys_encrypt.encryption_key = 'dGVzdC1rZXktcHJvdmlkZXJfa2V5c19lbmNyeXB0LTE='$$),
    ('ALTER DATABASE ... SET', $q$DO $d$ BEGIN EXECUTE format('ALTER DATABASE %I SET provider_keys_encrypt.gateway_api_key_hash_secret = %L', current_database(), 'a-gateway-secret'); END $d$$q$),
    ('a function''s SET clause', $$CREATE FUNCTION pg_temp.keyed() RETURNS int LANGUAGE sql SET provider_keys_encrypt.previous_keys = 'dGVzdC1rZXktcHJvdmlkZXJfa2V5c19lbmNyeXB0LTE=' AS 'SELECT 1'$$),
    ('SET LOCAL, blank', $$SET LOCAL provider_keys_encrypt.encryption_key = ''$$),
    ('SET, an unknown name under the prefix', $$SET provider_keys_encrypt.no_such_setting = 1$$)
  ) AS t(path, q);
-- nothing was stored anywhere
SELECT count(*) AS stored FROM pg_db_role_setting s, unnest(s.setconfig) c WHERE c LIKE 'provider_keys_encrypt.%';
