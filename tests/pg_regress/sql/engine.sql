-- CALL encrypt_provider_keys(): the main job, on the gateway's table.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
CREATE TABLE provider_key (
    id text PRIMARY KEY,
    token text NOT NULL,
    provider text NOT NULL,
    status text DEFAULT 'active',
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    base_url text,
    organization_id text
);
INSERT INTO provider_key (id, token, provider, status) VALUES
    ('k1', 'sk-proj-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'openai', 'active'),
    ('k2', 'sk-ant-api03-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb', 'anthropic', 'active'),
    ('k3', 'AIzaSyCccccccccccccccccccccccccccccccc', 'google-ai-studio', 'inactive'),
    ('k4', '0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef', 'together.ai', NULL),
    ('k5', 'gsk_deleted_dddddddddddddddddddddddddddddddd', 'groq', 'deleted');
CREATE TABLE originals AS SELECT id, token FROM provider_key;

SELECT * FROM provider_keys_encryption_report();

-- dry run: reports, writes nothing
CALL encrypt_provider_keys(dry_run => true);
SELECT count(*) AS unchanged FROM provider_key p JOIN originals o USING (id) WHERE p.token = o.token;

CALL encrypt_provider_keys();

-- every non-deleted key is now a token of its original; the deleted row was never written
SELECT p.id, p.status, is_encrypted_token(p.token) AS encrypted,
       CASE WHEN is_encrypted_token(p.token) THEN decrypt_token(p.token) = o.token
            ELSE p.token = o.token END AS original_kept
FROM provider_key p JOIN originals o USING (id) ORDER BY p.id;

-- idempotent: a second run encrypts nothing
CALL encrypt_provider_keys(verbose => false);
SELECT * FROM provider_keys_encryption_report(by_provider => true);

-- rollback: back to the exact originals
CALL decrypt_provider_keys(verbose => false);
SELECT count(*) AS restored FROM provider_key p JOIN originals o USING (id) WHERE p.token = o.token;

-- a table in another schema, passed by name
CREATE SCHEMA gw;
CREATE TABLE gw.keys (LIKE provider_key INCLUDING ALL);
INSERT INTO gw.keys SELECT * FROM provider_key;
CALL encrypt_provider_keys(table_name => 'gw.keys', batch_size => 2, verbose => false);
SELECT state, keys FROM provider_keys_encryption_report('gw.keys');

-- global problems are errors before anything is touched
CALL encrypt_provider_keys(table_name => 'no_such_table');
CREATE TABLE no_token (id text PRIMARY KEY, provider text, status text);
CALL encrypt_provider_keys(table_name => 'no_token');
CREATE TABLE no_index (id text, token text, provider text, status text);
CALL encrypt_provider_keys(table_name => 'no_index');
-- following the HINT
ALTER TABLE public.no_index ADD PRIMARY KEY (id);
CALL public.encrypt_provider_keys(table_name => 'no_index', verbose => false);
-- a unique index that orders ids otherwise than the column does (another collation, a
-- pattern operator class) does not count: a batch's id range would not be the batch's rows
CREATE TABLE other_order (id text NOT NULL, token text, provider text, status text);
CREATE UNIQUE INDEX other_order_c ON other_order (id COLLATE "C");
CREATE UNIQUE INDEX other_order_pattern ON other_order (id text_pattern_ops);
CALL encrypt_provider_keys(table_name => 'other_order');
-- following the HINT
ALTER TABLE public.other_order ADD PRIMARY KEY (id);
CALL public.encrypt_provider_keys(table_name => 'other_order', verbose => false);
DROP TABLE other_order;
CREATE TABLE null_id (id text UNIQUE, token text, provider text, status text);
CALL encrypt_provider_keys(table_name => 'null_id');
-- following the HINT
ALTER TABLE public.null_id ALTER COLUMN id SET NOT NULL;
CALL public.encrypt_provider_keys(table_name => 'null_id', verbose => false);
CREATE TABLE inh_parent (id text PRIMARY KEY, token text, provider text, status text);
CREATE TABLE inh_child () INHERITS (inh_parent);
CALL encrypt_provider_keys(table_name => 'inh_parent');
CALL encrypt_provider_keys(batch_size => 0);
SET search_path = gw;
CALL public.encrypt_provider_keys();
-- following the HINT
CALL public.encrypt_provider_keys(table_name => 'public.no_index', verbose => false);
RESET search_path;

-- An all-skipped re-run: the first batch has nothing to write, so one classification scan of
-- the whole table decides, and ends the run (one batch, not a walk of one batch per row).
-- When that scan finds a row to write, the walk goes on and writes it. (Counted with the
-- backend's own function statistics, before and after the CALL in one transaction.)
CREATE TABLE idle (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO idle (id, token, provider) SELECT 'i' || g, encrypt_token('sk-idle-' || g), 'openai' FROM generate_series(1, 5) g;
CREATE TEMP VIEW engine_calls AS
    SELECT f.funcname::text, f.calls FROM pg_stat_xact_user_functions f
     WHERE f.schemaname = 'pke_internal' AND f.funcname IN ('batch', 'run_idle_check');
BEGIN;
SET LOCAL track_functions = 'all';
CREATE TEMP TABLE calls_before ON COMMIT DROP AS SELECT * FROM engine_calls;
CALL encrypt_provider_keys('idle', batch_size => 1, verbose => false);
SELECT c.funcname, c.calls - coalesce(b.calls, 0) AS calls FROM engine_calls c LEFT JOIN calls_before b USING (funcname) ORDER BY 1;
ROLLBACK;
UPDATE idle SET token = 'sk-idle-written-later' WHERE id = 'i4';
BEGIN;
SET LOCAL track_functions = 'all';
CREATE TEMP TABLE calls_before ON COMMIT DROP AS SELECT * FROM engine_calls;
CALL encrypt_provider_keys('idle', batch_size => 1, verbose => false);
SELECT c.funcname, c.calls - coalesce(b.calls, 0) AS calls FROM engine_calls c LEFT JOIN calls_before b USING (funcname) ORDER BY 1;
COMMIT;
SELECT id, decrypt_token(token) FROM idle ORDER BY id;
DROP VIEW engine_calls;
DROP TABLE idle;
