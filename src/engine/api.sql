-- What users call: three procedures with the same arguments and the same guarantees, and the
-- report. They hold no logic: each is one call into pke_internal, with its mode named.
-- (0.2.0 added format and guard: the upgrade script drops 0.1.0's signatures.)
-- table_name NULL means provider_key, found through the caller's search_path at call time (a
-- regclass default would be resolved once, when the procedure is created).

CREATE PROCEDURE @extschema@.encrypt_provider_keys(
    table_name regclass DEFAULT NULL,
    batch_size integer DEFAULT 5000,    -- rows per batch (and per transaction outside a block)
    dry_run boolean DEFAULT false,
    verbose boolean DEFAULT true,
    encrypt_unverified boolean DEFAULT true,
    format text DEFAULT 'base64',       -- the token format: base64 (the seed guide's) or llmgw (the gateway's current)
    guard boolean DEFAULT false)        -- install the guard trigger before the first batch
LANGUAGE plpgsql
AS $proc$
BEGIN
    CALL pke_internal.run('encrypt', encrypt_provider_keys.format, encrypt_provider_keys.table_name,
                          encrypt_provider_keys.batch_size, encrypt_provider_keys.dry_run,
                          encrypt_provider_keys.verbose, encrypt_provider_keys.encrypt_unverified,
                          encrypt_provider_keys.guard);
END
$proc$;

COMMENT ON PROCEDURE @extschema@.encrypt_provider_keys(regclass, integer, boolean, boolean, boolean, text, boolean) IS
'Encrypt, in place, every plaintext key of a provider_key table. format base64: in column token, rows whose status is ''deleted'' left alone; format llmgw: the gateway''s backfill, from token into token_ciphertext, token_hash and token_masked, on every row. Idempotent; commits every batch_size rows when called outside a transaction block. guard => true first installs the guard trigger, so that no plaintext written meanwhile survives.';

CREATE PROCEDURE @extschema@.decrypt_provider_keys(
    table_name regclass DEFAULT NULL,
    batch_size integer DEFAULT 5000,
    dry_run boolean DEFAULT false,
    verbose boolean DEFAULT true,
    format text DEFAULT 'base64')
LANGUAGE plpgsql
AS $proc$
BEGIN
    CALL pke_internal.run('decrypt', decrypt_provider_keys.format, decrypt_provider_keys.table_name,
                          decrypt_provider_keys.batch_size, decrypt_provider_keys.dry_run,
                          decrypt_provider_keys.verbose, false, false);
END
$proc$;

COMMENT ON PROCEDURE @extschema@.decrypt_provider_keys(regclass, integer, boolean, boolean, text) IS
'Rollback of encrypt_provider_keys: turn every token (under the current or a previous key) back into its plaintext (format llmgw: back into column token). Refuses while a guard trigger is installed on the table.';

CREATE PROCEDURE @extschema@.reencrypt_provider_keys(
    table_name regclass DEFAULT NULL,
    batch_size integer DEFAULT 5000,
    dry_run boolean DEFAULT false,
    verbose boolean DEFAULT true,
    format text DEFAULT 'base64')
LANGUAGE plpgsql
AS $proc$
BEGIN
    CALL pke_internal.run('reencrypt', reencrypt_provider_keys.format, reencrypt_provider_keys.table_name,
                          reencrypt_provider_keys.batch_size, reencrypt_provider_keys.dry_run,
                          reencrypt_provider_keys.verbose, false, false);
END
$proc$;

COMMENT ON PROCEDURE @extschema@.reencrypt_provider_keys(regclass, integer, boolean, boolean, text) IS
'Key rotation: re-encrypt under the current key every token written under a previous key (format llmgw: every llmgw:v1 token and every v2 token under an older secret, and its token_hash).';

-- The report: rows per state (the token_state labels, plus deleted for a format that skips
-- soft-deleted rows) and per key id (the public id of the key a token belongs to: an older key
-- id with rows left means that key is still needed), optionally per provider. It uses the
-- format's re-encrypt descriptor, which needs the fewest columns (it works on the gateway's
-- final schema). format NULL: llmgw when the table has the gateway's token_ciphertext column,
-- else base64.
-- caller_schemas: the caller's search_path (the public function has no SET clause), for the
-- default table and the shadowing warning.
CREATE FUNCTION pke_internal.report(table_name regclass, by_provider boolean, format_name text, caller_schemas name[])
RETURNS TABLE (token_format text, provider text, state text, key_id text, keys bigint)
LANGUAGE plpgsql STABLE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    tbl regclass := COALESCE(table_name, pke_internal.default_table(caller_schemas));
    fmt text := COALESCE(format_name,
        CASE WHEN EXISTS (SELECT 1 FROM pg_attribute a
                           WHERE a.attrelid = tbl AND a.attname = 'token_ciphertext' AND a.attnum > 0
                             AND NOT a.attisdropped)
             THEN 'llmgw' ELSE 'base64' END);
    m pke_internal.mode := pke_internal.mode('reencrypt', fmt, false, tbl, check_privileges => false);
    current_key text;
BEGIN
    PERFORM pke_internal.warn_shadowing(caller_schemas);
    -- the report's own privilege: a REVOKE on the public function holds for this internal too
    IF NOT has_function_privilege('@extschema@.provider_keys_encryption_report(regclass, boolean, text)', 'EXECUTE') THEN
        RAISE EXCEPTION 'permission denied for function provider_keys_encryption_report'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    PERFORM pke_internal.check_table(tbl, m, false);
    EXECUTE 'SELECT ' || m.key_sql INTO current_key;  -- a clear error when there is no key
    RETURN QUERY EXECUTE format($q$
        WITH classified AS (
            SELECT CASE WHEN $1 THEN t.provider::text END AS provider, x.state,
                   CASE WHEN x.state IN ('current_key', 'previous_key', 'unverified') THEN %4$s END AS key_id
              FROM %1$s t,
                   LATERAL (SELECT CASE WHEN %2$s THEN 'deleted' ELSE (%3$s)::text END AS state) x),
        counted AS (
            SELECT c.provider, c.state, c.key_id, count(*) AS n FROM classified c GROUP BY 1, 2, 3),
        states(state, ord) AS (
            SELECT s::text, o FROM unnest(enum_range(NULL::pke_internal.token_state)) WITH ORDINALITY AS u(s, o)
            UNION ALL SELECT 'deleted', 100 WHERE %5$L <> 'false')
        SELECT $3, r.provider, r.state, r.key_id, r.n
          FROM (SELECT c.provider, c.state, c.key_id, c.n, st.ord
                  FROM counted c JOIN states st ON st.state = c.state
                UNION ALL
                -- without by_provider, every state is shown, with 0 when no row is in it
                SELECT NULL, st.state, CASE WHEN st.state = 'current_key' THEN $2 END, 0, st.ord
                  FROM states st
                 WHERE NOT $1 AND NOT EXISTS (SELECT 1 FROM counted c WHERE c.state = st.state)) r
         ORDER BY r.provider NULLS FIRST, r.ord, r.key_id NULLS FIRST $q$,
        tbl, m.deleted_sql, m.state_sql, m.key_id_sql, m.deleted_sql)
    USING by_provider, current_key, fmt;
END
$fn$;

CREATE FUNCTION @extschema@.provider_keys_encryption_report(
    table_name regclass DEFAULT NULL,
    by_provider boolean DEFAULT false,
    format text DEFAULT NULL)          -- base64 | llmgw; NULL: what the table's columns say
RETURNS TABLE (token_format text, provider text, state text, key_id text, keys bigint)
LANGUAGE sql STABLE PARALLEL UNSAFE
AS $fn$
    SELECT * FROM pke_internal.report(table_name, by_provider, format, pg_catalog.current_schemas(true))
$fn$;

COMMENT ON FUNCTION @extschema@.provider_keys_encryption_report(regclass, boolean, text) IS
'Keys per state (plaintext, current_key, previous_key, unverified, and deleted for base64) and key id, optionally per provider. format: base64 or llmgw (NULL: llmgw when the table has token_ciphertext). Whether a guard is installed: provider_keys_guard_status().';
