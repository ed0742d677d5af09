-- The guard: provider_keys_encrypt_guard() keeps plaintext out of a provider_key table while
-- something still writes it (old gateway code, an admin script, a restored row).
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
CREATE TABLE gk (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active',
                 base_url text);
-- The plain form: one trigger, no arguments (mode=encrypt, unverified=plaintext, format=base64).
CREATE TRIGGER provider_keys_encrypt_guard
    BEFORE INSERT OR UPDATE OF id, token, status ON gk
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard();
SELECT * FROM provider_keys_guard_status('gk');

-- A plaintext key is encrypted on write; the application reads it back with decrypt_token
-- (the gateway: with its ENCRYPTION_KEY, tests/integration/guard.test.mjs).
INSERT INTO gk (id, token, provider) VALUES ('g1', 'sk-guard-plain-0001', 'openai');
UPDATE gk SET token = 'sk-guard-new-0001' WHERE id = 'g1';
SELECT id, pke_internal.token_state(token), decrypt_token(token) FROM gk;
-- A token passes unchanged, and so does a deleted row, whatever it holds.
SELECT encrypt_token('sk-guard-token-0002') AS t2 \gset
INSERT INTO gk (id, token, provider) VALUES ('g2', :'t2', 'anthropic');
INSERT INTO gk (id, token, provider, status) VALUES ('g3', 'sk-guard-deleted-0003', 'groq', 'deleted');
SELECT id, token = :'t2' AS unchanged, token = 'sk-guard-deleted-0003' AS as_given FROM gk WHERE id IN ('g2', 'g3') ORDER BY id;
-- Un-deleting a row brings its plaintext back: the guard sees status change, and encrypts.
UPDATE gk SET status = 'active' WHERE id = 'g3';
SELECT id, status, pke_internal.token_state(token), decrypt_token(token) FROM gk WHERE id = 'g3';
-- A write that touches none of id, token and status does not fire it (UPDATE OF id, token, status).
UPDATE gk SET base_url = 'https://example.invalid' WHERE id = 'g2';
SELECT token = :'t2' AS unchanged FROM gk WHERE id = 'g2';
-- A new id fires it: a run walks the table in id order, and a plaintext row given a smaller
-- id would end behind its position. (This plaintext was written while the guard was off.)
ALTER TABLE gk DISABLE TRIGGER provider_keys_encrypt_guard;
INSERT INTO gk (id, token, provider) VALUES ('g9', 'sk-guard-moved-0009', 'mistral');
ALTER TABLE gk ENABLE TRIGGER provider_keys_encrypt_guard;
UPDATE gk SET id = 'g0' WHERE id = 'g9';
SELECT id, pke_internal.token_state(token), decrypt_token(token) FROM gk WHERE id = 'g0';
DELETE FROM gk WHERE id = 'g0';
-- A token-shaped value no key opens: the engine's treatment, a WARNING, encrypted as plaintext.
INSERT INTO gk (id, token, provider) VALUES ('g4', '0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef', 'together.ai');
SELECT id, pke_internal.token_state(token), decrypt_token(token) FROM gk WHERE id = 'g4';
-- A token under a previous key (rotation pending: the server has it in ENCRYPTION_KEY_PREVIOUS;
-- this one the gateway's Node code wrote) passes unchanged, as for the engine, and
-- reencrypt_provider_keys then moves it to the current key through the guard.
UPDATE gk SET token = 'QtLXRd2IzkY5AQROp3JvnJEDXArMs0EGx845gOMpUjLR9sr+' WHERE id = 'g1';
SELECT id, token = 'QtLXRd2IzkY5AQROp3JvnJEDXArMs0EGx845gOMpUjLR9sr+' AS unchanged, pke_internal.token_state(token) FROM gk WHERE id = 'g1';
CALL reencrypt_provider_keys('gk', verbose => false);
SELECT id, pke_internal.token_state(token), decrypt_token(token) FROM gk ORDER BY id;
SELECT count(*) AS rows, count(*) FILTER (WHERE pke_internal.token_state(token) = 'current_key') AS encrypted FROM gk;

-- The run says the table is clean, and a run with guard => true finds the guard installed.
CALL encrypt_provider_keys('gk', guard => true);

-- unverified=keep: such a value is written as given, with the WARNING.
DROP TRIGGER provider_keys_encrypt_guard ON gk;
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON gk
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard('unverified=keep');
UPDATE gk SET token = 'ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTAxMjM0NTY3OA==' WHERE id = 'g4';
SELECT id, token, pke_internal.token_state(token) FROM gk WHERE id = 'g4';
UPDATE gk SET token = 'sk-guard-plain-0004' WHERE id = 'g4';
SELECT id, pke_internal.token_state(token) FROM gk WHERE id = 'g4';

-- mode=reject: a plaintext write fails with 23000 and names the row, never the value.
DROP TRIGGER provider_keys_encrypt_guard ON gk;
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON gk
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard('mode=reject');
SELECT relation, trigger_name, mode, unverified, problem FROM provider_keys_guard_status('gk');
INSERT INTO gk (id, token, provider) VALUES ('g5', 'sk-guard-REFUSED-0005', 'openai');
UPDATE gk SET token = '0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef' WHERE id = 'g1';
SELECT sqlstate_of($$UPDATE gk SET token = 'sk-guard-REFUSED-0006' WHERE id = 'g2'$$);
-- tokens, deleted rows and other columns still pass; nothing was changed by the refusals
INSERT INTO gk (id, token, provider) VALUES ('g5', encrypt_token('sk-guard-token-0005'), 'openai');
INSERT INTO gk (id, token, provider, status) VALUES ('g6', 'sk-guard-deleted-0006', 'openai', 'deleted');
SELECT id, status, pke_internal.token_state(token) FROM gk ORDER BY id;
SELECT count(*) AS refused_values_stored FROM gk WHERE token LIKE '%REFUSED%';

-- Odd input raises nothing the engine would not: NULL tokens pass, huge plaintexts are 54000.
CREATE TABLE gk_null (id text PRIMARY KEY, token text, provider text NOT NULL, status text);
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON gk_null
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard();
INSERT INTO gk_null VALUES ('n1', NULL, 'openai', NULL), ('n2', '', 'openai', NULL);
SELECT id, token IS NULL AS is_null, pke_internal.token_state(token), decrypt_token(token) = '' AS empty FROM gk_null ORDER BY id;
SELECT sqlstate_of($$INSERT INTO gk_null VALUES ('n3', repeat('x', 70000), 'openai', NULL)$$);

-- varchar columns work; a varchar(n) too short for the token is 22001, as for the engine.
CREATE TABLE gk_varchar (id varchar(64) PRIMARY KEY, token varchar NOT NULL, provider varchar NOT NULL, status varchar);
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON gk_varchar
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard();
INSERT INTO gk_varchar VALUES ('v1', 'sk-guard-varchar-0001', 'openai', 'active');
SELECT id, pke_internal.token_state(token::text), decrypt_token(token::text) FROM gk_varchar;
CREATE TABLE gk_v40 (id varchar(64) PRIMARY KEY, token varchar(40) NOT NULL, provider varchar NOT NULL, status varchar);
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON gk_v40
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard();
INSERT INTO gk_v40 VALUES ('v2', 'sk-short', 'openai', 'active');
SELECT sqlstate_of($$INSERT INTO gk_v40 VALUES ('v3', encrypt_token('sk-short'), 'openai', 'active')$$) AS what_the_engine_raises;

-- Mistakes are errors with their own SQLSTATE, the first time the trigger fires.
CREATE TABLE gk_bad (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text);
-- Since 0.2.1 such a guard is refused when it is created (guard_partitions.sql); a guard
-- created while the extension's event trigger was off (as 0.2.0 allowed) fails at every write,
-- and the status function names its problem:
ALTER EVENT TRIGGER provider_keys_encrypt_guard_check DISABLE;
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE ON gk_bad
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard('reject');
INSERT INTO gk_bad VALUES ('b1', 'sk-bad', 'openai', NULL);
SELECT relation, mode, problem FROM provider_keys_guard_status('gk_bad');
DROP TRIGGER provider_keys_encrypt_guard ON gk_bad;
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE ON gk_bad
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard('mode=reject', 'mode=encrypt');
INSERT INTO gk_bad VALUES ('b1', 'sk-bad', 'openai', NULL);
DROP TRIGGER provider_keys_encrypt_guard ON gk_bad;
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE ON gk_bad
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard('format=llmgw');
INSERT INTO gk_bad VALUES ('b1', 'sk-bad', 'openai', NULL);
DROP TRIGGER provider_keys_encrypt_guard ON gk_bad;
CREATE TRIGGER provider_keys_encrypt_guard AFTER INSERT ON gk_bad
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard();
INSERT INTO gk_bad VALUES ('b1', 'sk-bad', 'openai', NULL);
SELECT relation, enabled, covers_writes FROM provider_keys_guard_status('gk_bad');
DROP TRIGGER provider_keys_encrypt_guard ON gk_bad;
ALTER EVENT TRIGGER provider_keys_encrypt_guard_check ENABLE;
CREATE TABLE gk_shape (id text PRIMARY KEY, token bytea NOT NULL, provider text NOT NULL, status text);
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT ON gk_shape
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard();
INSERT INTO gk_shape VALUES ('s1', 'sk-shape', 'openai', NULL);
CREATE TABLE gk_shape2 (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL);
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT ON gk_shape2
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard();
INSERT INTO gk_shape2 VALUES ('s1', 'sk-shape', 'openai');
SELECT sqlstate_of($$INSERT INTO gk_shape VALUES ('s1', 'sk-shape', 'openai', NULL)$$) AS bytea_token,
       sqlstate_of($$INSERT INTO gk_shape2 VALUES ('s1', 'sk-shape', 'openai')$$) AS no_status;
DROP TABLE gk_null, gk_varchar, gk_v40, gk_bad, gk_shape, gk_shape2;

-- One call installs the guard before the first batch, idempotently, with a NOTICE.
CREATE SCHEMA guard_demo;
SET search_path = guard_demo, public;
CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO provider_key SELECT 'pk' || g, 'sk-guard-call-' || g, 'openai', CASE WHEN g = 3 THEN 'deleted' END FROM generate_series(1, 5) g;
CALL encrypt_provider_keys(dry_run => true, guard => true);
SELECT count(*) AS guards_after_dry_run FROM provider_keys_guard_status('provider_key');
CALL encrypt_provider_keys(guard => true);
CALL encrypt_provider_keys(guard => true, verbose => false);
SELECT relation, trigger_name, enabled, covers_writes, mode, format, unverified, problem FROM provider_keys_guard_status();
INSERT INTO provider_key VALUES ('pk6', 'sk-guard-call-6', 'openai');
SELECT * FROM provider_keys_encryption_report();
-- encrypt_unverified => false installs it with unverified=keep, the run's own treatment
CREATE TABLE pk_keep (LIKE provider_key INCLUDING ALL);
CALL encrypt_provider_keys('pk_keep', guard => true, encrypt_unverified => false);
SELECT relation, mode, unverified FROM provider_keys_guard_status('pk_keep');
DROP TABLE pk_keep;

-- Installing a trigger needs the TRIGGER privilege (the owner's): one ERROR before any row.
CREATE ROLE guard_writer;
GRANT USAGE ON SCHEMA guard_demo TO guard_writer;
GRANT SELECT, UPDATE ON provider_key TO guard_writer;
CREATE TABLE pk_other (LIKE provider_key INCLUDING ALL);
INSERT INTO pk_other VALUES ('o1', 'sk-guard-other-1', 'openai');
GRANT SELECT, UPDATE ON pk_other TO guard_writer;
SET ROLE guard_writer;
CALL encrypt_provider_keys('pk_other', guard => true);
CALL encrypt_provider_keys('pk_other', verbose => false);  -- without the guard it may run
RESET ROLE;
SELECT id, pke_internal.token_state(token) FROM pk_other;
-- A disabled guard, or a foreign trigger of the guard's name, is not taken for a guard.
ALTER TABLE provider_key DISABLE TRIGGER provider_keys_encrypt_guard;
CALL encrypt_provider_keys(guard => true);
ALTER TABLE provider_key ENABLE TRIGGER provider_keys_encrypt_guard;
CREATE FUNCTION not_the_guard() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT ON pk_other FOR EACH ROW EXECUTE FUNCTION not_the_guard();
CALL encrypt_provider_keys('pk_other', guard => true);
DROP TABLE pk_other;
DROP FUNCTION not_the_guard();

-- The guard is the extension's own code and runs no SQL: a table whose only trigger is the
-- guard is a plain table to the run (pke_internal.check_table_trust asks who may change the
-- table, not what code it has). Its owner, not a superuser, installs it and runs as usual; a
-- superuser's run on it is refused for the owner's sake, guard or not.
CREATE TABLE pk_owned (LIKE provider_key INCLUDING ALL);
INSERT INTO pk_owned VALUES ('w1', 'sk-guard-owned-1', 'openai');
ALTER TABLE pk_owned OWNER TO guard_writer;
SET ROLE guard_writer;
CALL encrypt_provider_keys('pk_owned', guard => true);
CALL reencrypt_provider_keys('pk_owned', verbose => false);
INSERT INTO pk_owned VALUES ('w2', 'sk-guard-owned-2', 'openai');
RESET ROLE;
SELECT id, pke_internal.token_state(token), decrypt_token(token) FROM pk_owned ORDER BY id;
\set VERBOSITY terse
CALL encrypt_provider_keys('pk_owned');
\set VERBOSITY default
ALTER TABLE pk_owned OWNER TO CURRENT_USER;
CALL encrypt_provider_keys('pk_owned', verbose => false);
-- A guard with a WHEN clause may skip rows: it is not taken for one that protects the table.
DROP TRIGGER provider_keys_encrypt_guard ON pk_owned;
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON pk_owned
    FOR EACH ROW WHEN (NEW.provider <> 'test') EXECUTE FUNCTION provider_keys_encrypt_guard();
SELECT relation, covers_writes FROM provider_keys_guard_status('pk_owned');
CALL encrypt_provider_keys('pk_owned', guard => true);
DROP TABLE pk_owned;

-- The rollback does not fight the guard: decrypt_provider_keys refuses while it is installed,
-- before touching anything, and says how to remove it.
CALL decrypt_provider_keys();
SELECT count(*) FILTER (WHERE pke_internal.token_state(token) = 'current_key') AS still_encrypted FROM provider_key;
DROP TRIGGER provider_keys_encrypt_guard ON provider_key;
CALL decrypt_provider_keys(verbose => false);
SELECT id, status, token FROM provider_key ORDER BY id;

RESET search_path;
DROP SCHEMA guard_demo CASCADE;
DROP TABLE gk;
DROP ROLE guard_writer;

-- The gateway's llmgw layout: guard => true with format => 'llmgw' installs the guard with
-- ('format=llmgw'), fired on INSERT and UPDATE OF id, token. A plaintext token an old gateway
-- writes is moved into token_ciphertext, token_hash and token_masked for its own row (its id
-- and organization; NULL: the managed scope), soft-deleted rows included; token NULL (the new
-- code, the backfill itself) passes.
CREATE TABLE gw_guard (
    id text PRIMARY KEY, token text, token_ciphertext text, token_hash text, token_masked text,
    organization_id text, provider text NOT NULL, status text NOT NULL DEFAULT 'active',
    CHECK ((token IS NULL) <> (token_ciphertext IS NULL)));
INSERT INTO gw_guard (id, token, organization_id, provider, status) VALUES
    ('l1', 'sk-llmgw-guard-0001', 'org-a', 'openai', 'active'),
    ('l2', 'sk-llmgw-guard-0002', NULL, 'anthropic', 'active'),
    ('l3', 'sk-llmgw-guard-0003', 'org-a', 'groq', 'deleted');
CALL encrypt_provider_keys('gw_guard', format => 'llmgw', guard => true);
SELECT relation, trigger_name, enabled, covers_writes, mode, format, unverified, problem
  FROM provider_keys_guard_status('gw_guard');
SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'gw_guard'::regclass;
INSERT INTO gw_guard (id, token, organization_id, provider) VALUES ('l4', 'sk-llmgw-guard-0004', 'org-b', 'openai');
UPDATE gw_guard SET token = 'sk-llmgw-guard-0001-new' WHERE id = 'l1';
UPDATE gw_guard SET token = 'sk-llmgw-guard-0003-new', status = 'deleted' WHERE id = 'l3';
INSERT INTO gw_guard (id, token, token_ciphertext, token_hash, token_masked, organization_id, provider)
    SELECT 'l5', NULL, llmgw_encrypt_token('sk-llmgw-guard-0005', 'l5', 'org-b'),
           llmgw_token_hash('sk-llmgw-guard-0005'), llmgw_mask_token('sk-llmgw-guard-0005'), 'org-b', 'openai';
SELECT id, status, token IS NULL AS token_null, k.key,
       token_hash = llmgw_token_hash(k.key) AS hash_ok, token_masked = llmgw_mask_token(k.key) AS mask_ok
  FROM gw_guard, LATERAL (SELECT llmgw_decrypt_token(token_ciphertext, id, organization_id)::text AS key) k
 ORDER BY id;
-- An llmgw token written into column token: a WARNING naming the row, then kept as given
-- (unverified=keep, the llmgw default: the engine never seals a token twice).
INSERT INTO gw_guard (id, token, organization_id, provider)
    SELECT 'l6', token_ciphertext, organization_id, 'openai' FROM gw_guard WHERE id = 'l5';
SELECT id, token LIKE 'llmgw:v2:%' AS token_kept, token_ciphertext IS NULL AS no_ciphertext FROM gw_guard WHERE id = 'l6';
DELETE FROM gw_guard WHERE id = 'l6';
-- A plaintext on a row without an id: the llmgw functions' error, 22004.
SELECT sqlstate_of($$INSERT INTO gw_guard (id, token, provider) VALUES (NULL, 'sk-llmgw-no-id', 'openai')$$);
-- The run finds its guard installed; a run of the other format refuses it (55000).
CALL encrypt_provider_keys('gw_guard', format => 'llmgw', guard => true, verbose => false);
CALL encrypt_provider_keys('gw_guard', guard => true);
-- mode=reject, installed by hand: a plaintext is refused, token NULL passes.
DROP TRIGGER provider_keys_encrypt_guard ON gw_guard;
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token ON gw_guard
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard('format=llmgw', 'mode=reject');
SELECT relation, covers_writes, mode, format, unverified FROM provider_keys_guard_status('gw_guard');
UPDATE gw_guard SET token = 'sk-llmgw-REFUSED-0002' WHERE id = 'l2';
UPDATE gw_guard SET token = NULL, status = 'deleted' WHERE id = 'l2';
-- A base64 guard on this table is in the way of an llmgw run (55000), and the rollback
-- refuses while any guard is on.
DROP TRIGGER provider_keys_encrypt_guard ON gw_guard;
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON gw_guard
    FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard();
CALL encrypt_provider_keys('gw_guard', format => 'llmgw', guard => true);
CALL decrypt_provider_keys('gw_guard', format => 'llmgw');
-- The gateway's next migration: the three columns NOT NULL, column token dropped.
DROP TRIGGER provider_keys_encrypt_guard ON gw_guard;
ALTER TABLE gw_guard ALTER COLUMN token_ciphertext SET NOT NULL, ALTER COLUMN token_hash SET NOT NULL,
    ALTER COLUMN token_masked SET NOT NULL, DROP COLUMN token;
SELECT count(*) AS rows_after_migration FROM gw_guard;
DROP TABLE gw_guard;
