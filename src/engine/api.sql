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
    format text DEFAULT 'base64',       -- the token format: base64 (the seed guide's)
    guard boolean DEFAULT false)        -- install the guard trigger (guard.sql) before the first batch
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
'Encrypt, in place, every plaintext token of a provider_key table whose status is not ''deleted''. Idempotent; commits every batch_size rows when called outside a transaction block. guard => true first installs the guard trigger, so that no plaintext written meanwhile survives.';

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
'Rollback of encrypt_provider_keys: turn every token (under the current or a previous key) back into its plaintext. Refuses while a guard trigger is installed on the table.';

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
'Key rotation: re-encrypt under the current key every token written under a previous key.';

-- The report: rows per state (the token_state labels, plus deleted), optionally per provider.
CREATE FUNCTION pke_internal.report(tbl regclass, by_provider boolean)
RETURNS TABLE (provider text, state text, keys bigint)
LANGUAGE plpgsql STABLE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode('encrypt', 'base64', true, check_privileges => false);
BEGIN
    PERFORM pke_internal.check_table(tbl, false);
    PERFORM @extschema@.provider_keys_encrypt_fingerprint();  -- a clear error when no key
    RETURN QUERY EXECUTE format($q$
        WITH classified AS (
            SELECT CASE WHEN $1 THEN t.provider::text END AS provider,
                   CASE WHEN %2$s THEN 'deleted' ELSE (%3$s)::text END AS state
              FROM %1$s t),
        counted AS (
            SELECT c.provider, c.state, count(*) AS n FROM classified c GROUP BY 1, 2),
        states(state, ord) AS (
            SELECT s::text, o FROM unnest(enum_range(NULL::pke_internal.token_state)) WITH ORDINALITY AS u(s, o)
            UNION ALL SELECT 'deleted', 100)
        SELECT p.provider, st.state, COALESCE(c.n, 0)::bigint
          FROM (SELECT DISTINCT counted.provider FROM counted
                UNION SELECT NULL::text WHERE NOT $1) p
         CROSS JOIN states st
          LEFT JOIN counted c ON c.provider IS NOT DISTINCT FROM p.provider AND c.state = st.state
         WHERE NOT $1 OR c.n IS NOT NULL
         ORDER BY p.provider NULLS FIRST, st.ord $q$, tbl, m.deleted_sql, m.state_sql)
    USING by_provider;
END
$fn$;

CREATE OR REPLACE FUNCTION @extschema@.provider_keys_encryption_report(
    table_name regclass DEFAULT NULL,
    by_provider boolean DEFAULT false)
RETURNS TABLE (provider text, state text, keys bigint)
LANGUAGE sql STABLE PARALLEL UNSAFE
AS $fn$
    SELECT * FROM pke_internal.report(COALESCE(table_name, pg_catalog.to_regclass('provider_key')), by_provider)
$fn$;

COMMENT ON FUNCTION @extschema@.provider_keys_encryption_report(regclass, boolean) IS
'Keys per state (plaintext, current_key, previous_key, unverified, deleted), optionally per provider. Whether a guard is installed: provider_keys_guard_status().';
