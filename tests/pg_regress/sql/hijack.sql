-- An attacker with CREATE on public plants operators and function overloads for every
-- operator and argument type the engine uses, then a superuser runs every procedure with
-- public FIRST on its search_path (the worst case), on text and varchar tables, outside and
-- inside a transaction block. Whatever is planted must never run: it would run as the
-- superuser, who can read the key.
\set VERBOSITY terse
\set SHOW_CONTEXT never
SET client_min_messages = warning;
DROP ROLE IF EXISTS mallory;
CREATE ROLE mallory LOGIN;
GRANT CREATE ON SCHEMA public TO mallory;

-- The superuser's tables: text and varchar columns.
CREATE TABLE hk_text (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
CREATE TABLE hk_varchar (id varchar(64) PRIMARY KEY, token varchar NOT NULL, provider varchar NOT NULL, status varchar DEFAULT 'active');
INSERT INTO hk_text SELECT 'k' || g, 'sk-hijack-' || g, 'openai', CASE WHEN g % 7 = 0 THEN 'deleted' ELSE 'active' END
  FROM generate_series(1, 30) g;
INSERT INTO hk_varchar SELECT * FROM hk_text;
CREATE TABLE hk_originals AS SELECT id, token FROM hk_text;
-- tables the guard will protect: the superuser's own writes go through it
CREATE TABLE hk_guard_text (LIKE hk_text INCLUDING ALL);
CREATE TABLE hk_guard_varchar (LIKE hk_varchar INCLUDING ALL);
INSERT INTO hk_guard_text SELECT * FROM hk_text;
INSERT INTO hk_guard_varchar SELECT * FROM hk_text;
-- and a provider_key table, found through search_path
CREATE SCHEMA hk;
CREATE TABLE hk.provider_key (LIKE hk_text INCLUDING ALL);
INSERT INTO hk.provider_key SELECT * FROM hk_text;
-- The gateway's current format (llmgw): its rollout schema, text and varchar, with the XOR
-- constraint; and a table on its final schema (no token column) holding v1 tokens to rotate (a
-- v1 token is a v2 token without its key id: same data key, same associated data).
CREATE TABLE hk_gw_text (id text PRIMARY KEY, token text, token_ciphertext text, token_hash text, token_masked text,
                         provider text NOT NULL, status text, organization_id text,
                         CHECK ((token IS NULL) <> (token_ciphertext IS NULL)));
CREATE TABLE hk_gw_varchar (id varchar(64) PRIMARY KEY, token varchar, token_ciphertext varchar, token_hash varchar(64),
                            token_masked varchar, provider varchar NOT NULL, status varchar, organization_id varchar,
                            CHECK ((token IS NULL) <> (token_ciphertext IS NULL)));
INSERT INTO hk_gw_text (id, token, provider, status, organization_id)
  SELECT id, token, provider, status, CASE WHEN id LIKE '%2' THEN NULL ELSE 'org-' || length(id) END FROM hk_text;
INSERT INTO hk_gw_varchar SELECT * FROM hk_gw_text;
CREATE TABLE hk_gw_final (LIKE hk_gw_text INCLUDING ALL);
INSERT INTO hk_gw_final SELECT * FROM hk_gw_text;
ALTER TABLE hk_gw_final DROP COLUMN token;
UPDATE hk_gw_final g
   SET token_ciphertext = (SELECT 'llmgw:v1:' || split_part(c, ':', 4) || ':' || split_part(c, ':', 5) || ':' || split_part(c, ':', 6)
                             FROM llmgw_encrypt_token(o.token, g.id, g.organization_id) AS c),
       token_hash = 'older-hash', token_masked = llmgw_mask_token(o.token)
  FROM hk_originals o
 WHERE o.id = g.id;
ALTER TABLE hk_gw_final ALTER COLUMN token_ciphertext SET NOT NULL;
-- the failing-row path: a trigger (the superuser's own) that refuses one row
CREATE FUNCTION hk_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id = 'k3' THEN RAISE EXCEPTION 'row k3 refused'; END IF;
    RETURN NEW;
END $$;

-- From here on, every comparison the test itself makes names pg_catalog's operator: the
-- planted ones would win over a built-in that needs a cast, in the test's own queries too.
SET ROLE mallory;
CREATE TABLE public.hijacked (what text, by_role text);
GRANT INSERT ON public.hijacked TO PUBLIC;
CREATE FUNCTION public.hijack_note(what text) RETURNS void LANGUAGE sql
AS $$ INSERT INTO public.hijacked VALUES (what, current_user) $$;
-- Operators: every pair of these types, for every operator below.
DO $plant$
DECLARE
    types text[] := ARRAY['text', 'varchar', 'name', 'oid', 'regclass', 'regtype', 'regnamespace',
                          'regrole', 'integer', 'bigint', 'numeric', 'double precision', 'boolean',
                          'timestamptz', 'interval', 'pke_internal.token_state', 'text[]',
                          'pke_internal.token_state[]', '"char"', 'smallint'];
    ops text[] := ARRAY['=', '<>', '<', '>', '<=', '>=', '||', '+', '-', '*', '/'];
    l text; r text; op text; n integer := 0;
BEGIN
    FOREACH l IN ARRAY types LOOP
        FOREACH r IN ARRAY types LOOP
            n := n + 1;
            EXECUTE format('CREATE FUNCTION public.hj_op_%s(a %s, b %s) RETURNS boolean LANGUAGE plpgsql
                            AS $f$ BEGIN PERFORM public.hijack_note(%L); RETURN NULL; END $f$',
                           n, l, r, format('operator(%s, %s)', l, r));
            FOREACH op IN ARRAY ops LOOP
                EXECUTE format('CREATE OPERATOR public.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = public.hj_op_%s)',
                               op, l, r, n);
            END LOOP;
        END LOOP;
    END LOOP;
END
$plant$;
-- Functions the engine calls, overloaded for varchar and text in public.
DO $plant$
DECLARE
    fns text[] := ARRAY['encrypt_token', 'decrypt_token', 'is_encrypted_token', 'token_state', 'reencrypt',
                        'to_regclass', 'format', 'replace', 'set_config', 'round', 'has_column_privilege',
                        'has_function_privilege', 'pg_has_role', 'array_to_string', 'provider_keys_encrypt_fingerprint',
                        'may_commit', 'pg_current_xact_id', 'clock_timestamp', 'getdatabaseencoding', 'unnest',
                        'enum_range', 'date_part', 'greatest', 'max', 'count', 'provider_keys_encrypt_guard',
                        'guard_settings', 'guards', 'has_table_privilege', 'quote_ident', 'cardinality',
                        'pg_partition_tree', 'provider_keys_guard_status',
                        'llmgw_state', 'llmgw_reencrypt', 'llmgw_key_id_of', 'token_key_id', 'llmgw_key_id',
                        'llmgw_token_hash', 'llmgw_mask_token', 'split_part'];
    f text; t text;
BEGIN
    FOREACH f IN ARRAY fns LOOP
        FOREACH t IN ARRAY ARRAY['varchar', 'text', 'unknown'] LOOP
            BEGIN
                EXECUTE format('CREATE FUNCTION public.%I(a %s) RETURNS text LANGUAGE plpgsql
                                AS $f$ BEGIN PERFORM public.hijack_note(%L); RETURN NULL; END $f$',
                               f, t, format('%s(%s)', f, t));
            EXCEPTION WHEN others THEN NULL;  -- exists already (ours, in public): can't be planted
            END;
        END LOOP;
    END LOOP;
END
$plant$;
-- The llmgw functions take three arguments: overloads for every mix of text and varchar.
DO $plant$
DECLARE
    f text; a text; b text; c text;
BEGIN
    FOREACH f IN ARRAY ARRAY['llmgw_encrypt_token', 'llmgw_decrypt_token', 'llmgw_reencrypt', 'llmgw_key_id_of'] LOOP
        FOREACH a IN ARRAY ARRAY['varchar', 'text'] LOOP
            FOREACH b IN ARRAY ARRAY['varchar', 'text'] LOOP
                FOREACH c IN ARRAY ARRAY['varchar', 'text'] LOOP
                    BEGIN
                        EXECUTE format('CREATE FUNCTION public.%I(x %s, y %s, z %s) RETURNS text LANGUAGE plpgsql
                                        AS $f$ BEGIN PERFORM public.hijack_note(%L); RETURN NULL; END $f$',
                                       f, a, b, c, format('%s(%s, %s, %s)', f, a, b, c));
                    EXCEPTION WHEN others THEN NULL;  -- ours (text, text, text): can't be planted
                    END;
                END LOOP;
            END LOOP;
        END LOOP;
    END LOOP;
END
$plant$;
RESET ROLE;
SELECT count(*) OPERATOR(pg_catalog.>) 4000 AS planted_operators FROM pg_operator WHERE oprnamespace OPERATOR(pg_catalog.=) 'public'::regnamespace;


SET search_path = hk, public, pg_catalog;
SET client_min_messages = warning;
-- outside a transaction block (the procedures COMMIT between batches)
CALL encrypt_provider_keys('hk_text', batch_size => 7, dry_run => true);
CALL encrypt_provider_keys('hk_text', batch_size => 7);
CALL encrypt_provider_keys('hk_varchar', batch_size => 7);
CALL encrypt_provider_keys(batch_size => 7);  -- hk.provider_key, through search_path
SELECT * FROM provider_keys_encryption_report('hk_varchar');
CALL reencrypt_provider_keys('hk_varchar', batch_size => 7);
CALL decrypt_provider_keys('hk_varchar', batch_size => 7);
-- inside a transaction block
BEGIN;
CALL encrypt_provider_keys('hk_varchar', batch_size => 7);
CALL decrypt_provider_keys('hk_text', batch_size => 7);
COMMIT;
CREATE TRIGGER hk_refuse BEFORE UPDATE ON hk_text FOR EACH ROW EXECUTE FUNCTION hk_refuse();
CALL encrypt_provider_keys('hk_text', batch_size => 7);
BEGIN;
CALL decrypt_provider_keys('hk_text', batch_size => 7);
ROLLBACK;
-- the guard: installed by the run, then the superuser's own plaintext writes go through it
-- (text and varchar), and its status is read; the test's own comparisons name pg_catalog's
CALL encrypt_provider_keys('hk_guard_text', batch_size => 7, guard => true);
CALL encrypt_provider_keys('hk_guard_varchar', batch_size => 7, guard => true);
CALL encrypt_provider_keys('hk_guard_varchar', batch_size => 7, guard => true, verbose => false);
INSERT INTO hk_guard_text VALUES ('g1', 'sk-hijack-guard-1', 'openai');
INSERT INTO hk_guard_varchar VALUES ('g1', 'sk-hijack-guard-1', 'openai');
UPDATE hk_guard_text SET token = 'sk-hijack-guard-2' WHERE id OPERATOR(pg_catalog.=) 'k1'::text;
UPDATE hk_guard_varchar SET token = 'sk-hijack-guard-2'::varchar WHERE id OPERATOR(pg_catalog.=) 'k1'::varchar;
UPDATE hk_guard_varchar SET status = 'active'::varchar WHERE id OPERATOR(pg_catalog.=) 'k7'::varchar;
SELECT relation, enabled, covers_writes, mode FROM provider_keys_guard_status('hk_guard_varchar'::regclass);
-- format llmgw: the backfill, the report, rotation on the final schema, the rollback, inside a
-- block, and the failing-row path
CALL encrypt_provider_keys('hk_gw_text', batch_size => 7, format => 'llmgw', dry_run => true);
CALL encrypt_provider_keys('hk_gw_text', batch_size => 7, format => 'llmgw');
CALL encrypt_provider_keys('hk_gw_varchar', batch_size => 7, format => 'llmgw');
SELECT * FROM provider_keys_encryption_report('hk_gw_varchar');
SELECT * FROM provider_keys_encryption_report('hk_gw_final', format => 'llmgw');
CALL reencrypt_provider_keys('hk_gw_final', batch_size => 7, format => 'llmgw');
CALL decrypt_provider_keys('hk_gw_varchar', batch_size => 7, format => 'llmgw');
BEGIN;
CALL encrypt_provider_keys('hk_gw_varchar', batch_size => 7, format => 'llmgw');
CALL reencrypt_provider_keys('hk_gw_varchar', batch_size => 7, format => 'llmgw');
COMMIT;
CREATE TRIGGER hk_refuse BEFORE UPDATE ON hk_gw_text FOR EACH ROW EXECUTE FUNCTION hk_refuse();
BEGIN;
CALL decrypt_provider_keys('hk_gw_text', batch_size => 7, format => 'llmgw');
ROLLBACK;
CALL decrypt_provider_keys('hk_gw_text', batch_size => 7, format => 'llmgw');
RESET search_path;
RESET client_min_messages;

-- nothing planted ran
SELECT count(*) AS hijacked_calls FROM public.hijacked;
-- and the data is right. hk_text: decrypted inside the block, then encrypted again except k3
-- (refused by its trigger); hk_varchar: encrypted, re-encrypted, decrypted, encrypted again.
-- Soft-deleted rows are never written. (The planted is_encrypted_token(text) makes a call with
-- one argument ambiguous: the test names both.)
SELECT count(*) FILTER (WHERE is_encrypted_token(t.token, true)) AS text_encrypted,
       count(*) FILTER (WHERE NOT is_encrypted_token(t.token, true) AND t.token OPERATOR(pg_catalog.=) o.token) AS text_plain,
       count(*) FILTER (WHERE is_encrypted_token(t.token, true) AND decrypt_token(t.token) OPERATOR(pg_catalog.=) o.token) AS text_round_trip
  FROM hk_text t JOIN hk_originals o ON t.id OPERATOR(pg_catalog.=) o.id;
SELECT count(*) FILTER (WHERE is_encrypted_token(v.token::text, true)
                          AND decrypt_token(v.token::text) OPERATOR(pg_catalog.=) o.token) AS varchar_round_trip,
       count(*) FILTER (WHERE v.token::text OPERATOR(pg_catalog.=) o.token) AS varchar_plain
  FROM hk_varchar v JOIN hk_originals o ON v.id::text OPERATOR(pg_catalog.=) o.id;

SELECT count(*) AS hk_provider_key_encrypted FROM hk.provider_key WHERE is_encrypted_token(token::text, true);
-- the guarded tables: every row not deleted is a token of its latest plaintext (k7 came back
-- from deleted and was encrypted on the way)
SELECT 'text' AS guarded, count(*) FILTER (WHERE status IS DISTINCT FROM 'deleted') AS live,
       count(*) FILTER (WHERE status IS DISTINCT FROM 'deleted' AND is_encrypted_token(token, true)) AS encrypted,
       string_agg(CASE WHEN is_encrypted_token(token, true) AND id IN ('g1', 'k1') THEN id || '=' || decrypt_token(token) END, ', ' ORDER BY id) AS latest
  FROM hk_guard_text
UNION ALL
SELECT 'varchar', count(*) FILTER (WHERE status::text IS DISTINCT FROM 'deleted'),
       count(*) FILTER (WHERE status::text IS DISTINCT FROM 'deleted' AND is_encrypted_token(token::text, true)),
       string_agg(CASE WHEN is_encrypted_token(token::text, true) AND id::text IN ('g1', 'k1', 'k7') THEN id::text || '=' || decrypt_token(token::text) END, ', ' ORDER BY id::text)
  FROM hk_guard_varchar;
-- llmgw: hk_gw_varchar sealed (again) under the current key id, every row, soft-deleted ones
-- too; hk_gw_final rotated from v1; hk_gw_text rolled back except k3 (refused by its trigger)
SELECT count(*) FILTER (WHERE v.token IS NULL AND split_part(v.token_ciphertext::text, ':', 3) OPERATOR(pg_catalog.=) llmgw_key_id()
                          AND llmgw_decrypt_token(v.token_ciphertext::text, v.id::text, v.organization_id::text) OPERATOR(pg_catalog.=) o.token
                          AND v.token_hash::text OPERATOR(pg_catalog.=) llmgw_token_hash(o.token)) AS gw_varchar_sealed
  FROM hk_gw_varchar v JOIN hk_originals o ON v.id::text OPERATOR(pg_catalog.=) o.id;
SELECT count(*) FILTER (WHERE split_part(f.token_ciphertext, ':', 3) OPERATOR(pg_catalog.=) llmgw_key_id()
                          AND llmgw_decrypt_token(f.token_ciphertext, f.id, f.organization_id) OPERATOR(pg_catalog.=) o.token
                          AND f.token_hash OPERATOR(pg_catalog.=) llmgw_token_hash(o.token)) AS gw_final_rotated
  FROM hk_gw_final f JOIN hk_originals o ON f.id OPERATOR(pg_catalog.=) o.id;
SELECT count(*) FILTER (WHERE t.token OPERATOR(pg_catalog.=) o.token AND t.token_ciphertext IS NULL) AS gw_text_plain,
       count(*) FILTER (WHERE t.token IS NULL
                          AND llmgw_decrypt_token(t.token_ciphertext, t.id, t.organization_id) OPERATOR(pg_catalog.=) o.token) AS gw_text_sealed
  FROM hk_gw_text t JOIN hk_originals o ON t.id OPERATOR(pg_catalog.=) o.id;

-- A table owned by the attacker, with a trigger: a superuser's run refuses to execute the
-- attacker's code with superuser rights; the owner itself may run it.
SET ROLE mallory;
CREATE TABLE public.mallory_keys (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO public.mallory_keys VALUES ('m1', 'sk-mallory', 'openai');
CREATE FUNCTION public.steal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM public.hijack_note('trigger as ' || current_user); RETURN NEW; END $$;
CREATE TRIGGER steal BEFORE UPDATE ON public.mallory_keys FOR EACH ROW EXECUTE FUNCTION public.steal();
RESET ROLE;
\set VERBOSITY default
CALL encrypt_provider_keys('mallory_keys');
\set VERBOSITY terse
SELECT count(*) AS hijacked_calls FROM public.hijacked;
SET ROLE mallory;
CALL encrypt_provider_keys('mallory_keys', verbose => false);
RESET ROLE;
SELECT what, by_role FROM public.hijacked;
TRUNCATE public.hijacked;

-- The same holds for every relation of the tree, and for whoever holds TRIGGER on it: the
-- superuser's partitioned table with a partition mallory owns, and a superuser's table on which
-- mallory was granted TRIGGER, are refused before a row is touched.
CREATE TABLE hk_parted (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text) PARTITION BY RANGE (id);
CREATE TABLE hk_part_a PARTITION OF hk_parted FOR VALUES FROM ('a') TO ('m');
CREATE TABLE hk_part_m PARTITION OF hk_parted FOR VALUES FROM ('m') TO ('z');
ALTER TABLE hk_part_m OWNER TO mallory;
INSERT INTO hk_parted VALUES ('b1', 'sk-part-b1', 'openai', 'active'), ('m1', 'sk-part-m1', 'openai', 'active');
SET ROLE mallory;
CREATE TRIGGER steal BEFORE UPDATE ON hk_part_m FOR EACH ROW EXECUTE FUNCTION public.steal();
RESET ROLE;
CALL encrypt_provider_keys('hk_parted');
ALTER TABLE hk_part_m OWNER TO CURRENT_USER;
DROP TRIGGER steal ON hk_part_m;
CALL encrypt_provider_keys('hk_parted', verbose => false);  -- now every relation is the superuser's
CREATE TABLE hk_granted (LIKE hk_text INCLUDING ALL);
GRANT TRIGGER ON hk_granted TO mallory;
CALL encrypt_provider_keys('hk_granted');
SELECT count(*) AS hijacked_calls FROM public.hijacked;

-- Internals never get around a REVOKE, even with an overload of the public procedure planted
-- next to it: mallory may decrypt tokens, but not run decrypt_provider_keys.
GRANT EXECUTE ON FUNCTION decrypt_token(text) TO mallory;
SET ROLE mallory;
CREATE PROCEDURE public.decrypt_provider_keys(x integer) LANGUAGE sql AS 'SELECT 1';
CREATE TABLE public.mallory_enc (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text);
INSERT INTO public.mallory_enc VALUES ('e1', encrypt_token('sk-mallory-enc'), 'openai', 'active');
CALL pke_internal.run('decrypt', 'base64', 'public.mallory_enc', 100, false, false, false, false);
SELECT pke_internal.batch_apply(pg_catalog.jsonb_populate_record(NULL::pke_internal.run, '{"mode": "decrypt", "format": "base64", "tbl": "public.mallory_enc", "batch_size": 100, "dry_run": false, "may_commit": false, "encrypt_unverified": false}'), NULL, false, false, false);
SELECT pke_internal.batch_apply(pg_catalog.jsonb_populate_record(NULL::pke_internal.run, '{"mode": "encrypt", "format": "base64", "tbl": "public.mallory_enc", "batch_size": 100, "dry_run": false, "may_commit": false, "encrypt_unverified": true}'), NULL, false, false, false);
SELECT count(*) AS still_one_token_deep FROM public.mallory_enc WHERE decrypt_token(token) OPERATOR(pg_catalog.=) 'sk-mallory-enc';
RESET ROLE;
REVOKE EXECUTE ON FUNCTION decrypt_token(text) FROM mallory;
-- the same for llmgw: mallory may open llmgw tokens, but not run decrypt_provider_keys
GRANT EXECUTE ON FUNCTION llmgw_decrypt_token(text, text, text) TO mallory;
SET ROLE mallory;
CREATE TABLE public.mallory_gw (id text PRIMARY KEY, token text, token_ciphertext text, token_hash text, token_masked text,
                                provider text NOT NULL, status text, organization_id text);
INSERT INTO public.mallory_gw (id, token_ciphertext, provider) VALUES ('e1', llmgw_encrypt_token('sk-mallory-gw', 'e1', NULL), 'openai');
CALL pke_internal.run('decrypt', 'llmgw', 'public.mallory_gw', 100, false, false, false, false);
SELECT pke_internal.batch_apply(pg_catalog.jsonb_populate_record(NULL::pke_internal.run, '{"mode": "decrypt", "format": "llmgw", "tbl": "public.mallory_gw", "batch_size": 100, "dry_run": false, "may_commit": false, "encrypt_unverified": false}'), NULL, false, false, false);
SELECT count(*) AS still_sealed FROM public.mallory_gw WHERE token IS NULL AND token_ciphertext IS NOT NULL;
RESET ROLE;
REVOKE EXECUTE ON FUNCTION llmgw_decrypt_token(text, text, text) FROM mallory;

-- An extension schema anyone can create in is refused at CREATE EXTENSION.
CREATE DATABASE pke_writable_public;
\c pke_writable_public
GRANT CREATE ON SCHEMA public TO mallory;
\set VERBOSITY default
CREATE EXTENSION provider_keys_encrypt;
\set VERBOSITY terse
CREATE SCHEMA pke;
CREATE EXTENSION provider_keys_encrypt SCHEMA pke;
SELECT extnamespace::regnamespace AS installed_in FROM pg_extension WHERE extname = 'provider_keys_encrypt';
\c provider_keys_encrypt_regress
DROP DATABASE pke_writable_public;

-- clean up
DROP TABLE public.mallory_keys, public.mallory_enc, public.mallory_gw, hk_gw_text, hk_gw_varchar, hk_gw_final, hk_text, hk_varchar, hk_originals, hk_parted, hk_granted, hk_guard_text, hk_guard_varchar, public.hijacked CASCADE;
DROP SCHEMA hk CASCADE;
DROP FUNCTION hk_refuse();
DROP OWNED BY mallory CASCADE;
DROP ROLE mallory;
SELECT count(*) AS operators_left FROM pg_operator WHERE oprnamespace OPERATOR(pg_catalog.=) 'public'::regnamespace;
