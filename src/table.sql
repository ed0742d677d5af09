-- The table engine: one engine (_pke_run + _pke_batch) behind three procedures and a report.
--
-- A run walks the table in id order, about batch_size rows at a time (keyset pagination on the
-- unique index on id: memory stays flat and each batch is an index range scan). A batch first
-- fixes its range (after the previous batch's last id, up to the batch_size-th id), then runs
-- ONE statement over it:
--
--   written : UPDATE the rows of the range this mode changes, chosen by the state of their
--             token, classified in Rust: 0 plaintext, 1 current key, 2 previous key, 3
--             token-shaped but authenticating under no configured key ("unverified").
--             Deleted rows (status = 'deleted'; NULL counts as active) are never written.
--   the read: beside it, in the same snapshot, count every row of the range by state.
--
-- No lost update: if the application changes a row after the statement's snapshot, the UPDATE
-- waits for it and re-checks its conditions on the new version (EvalPlanQual), then computes
-- the new token from that version. A new plaintext gets encrypted as the application wrote
-- it; a token or a soft delete is left alone (counted as changed_concurrently). Nothing is
-- ever overwritten with a value derived from an older one.
--
-- Failures and subtransactions. A row whose write raises (trigger, constraint, ...) must be
-- rolled back alone. Catching an error needs a subtransaction, and more than 64 *committed*
-- subtransactions with an XID in one open transaction overflow this backend's cache, which
-- makes every snapshot on the server "suboverflowed" (slow). Aborted subtransactions leave
-- the cache, so the engine only ever keeps committed ones it can count:
--
--   outside a transaction block (may commit): the batch statement runs in one savepoint;
--       on success the procedure COMMITs -> at most one written subtransaction per
--       transaction. Intermediate commits use synchronous_commit = off (a crash can only
--       lose work a re-run redoes; the last commit is synchronous and flushes the rest).
--   inside a transaction block (cannot commit): the batch statement is first tried in a
--       savepoint that is always rolled back, then run for real at the caller's level ->
--       zero written subtransactions, at twice the work per row.
--   a batch that fails: every row is probed in its own savepoint that is always rolled
--       back; failing rows get a WARNING and count as errors; the rows that passed are
--       written together by the normal batch path. Still no committed subtransaction per row.
--
-- All objects are referenced schema-qualified: procedures that COMMIT cannot carry a
-- SET search_path clause.

-- The table a run works on: the argument, or provider_key found through search_path at call
-- time. (A regclass default would be resolved once, when the procedure is created.)
CREATE FUNCTION @extschema@._pke_table(table_name regclass)
RETURNS regclass
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $fn$
DECLARE
    tbl regclass := COALESCE(table_name, pg_catalog.to_regclass('provider_key'));
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'relation "provider_key" does not exist'
            USING ERRCODE = 'undefined_table',
                  HINT = 'Check search_path, or name the table: CALL encrypt_provider_keys(table_name => ''myschema.provider_key'').';
    END IF;
    RETURN tbl;
END
$fn$;

-- Check the table before anything is touched: a table, the four columns as text, a unique
-- index on id, and the caller's privileges. Raises with a specific SQLSTATE.
CREATE FUNCTION @extschema@._pke_check_table(tbl regclass, need_update boolean)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $fn$
DECLARE
    col text;
    typ regtype;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'table_name must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                   WHERE c.oid = tbl AND c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::"char"[])) THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = 'wrong_object_type';
    END IF;
    FOREACH col IN ARRAY ARRAY['id', 'token', 'provider', 'status'] LOOP
        SELECT a.atttypid::regtype INTO typ
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'column "%" of relation % does not exist', col, tbl
                USING ERRCODE = 'undefined_column',
                      HINT = 'The table needs the provider_key columns id, token, provider and status.';
        END IF;
        IF typ NOT IN ('text'::regtype, 'character varying'::regtype) THEN
            RAISE EXCEPTION 'column "%" of relation % must be text or varchar, not %', col, tbl, typ
                USING ERRCODE = 'datatype_mismatch';
        END IF;
        IF NOT pg_catalog.has_column_privilege(tbl, col, 'SELECT') THEN
            RAISE EXCEPTION 'permission denied to read column "%" of table %', col, tbl
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END LOOP;
    IF need_update AND NOT pg_catalog.has_column_privilege(tbl, 'token', 'UPDATE') THEN
        RAISE EXCEPTION 'permission denied to update column "token" of table %', tbl
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT EXISTS (SELECT 1
                     FROM pg_catalog.pg_index i
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                    WHERE i.indrelid = tbl AND i.indisunique AND i.indisvalid AND i.indnkeyatts = 1
                      AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = 'id') THEN
        RAISE EXCEPTION 'relation % has no unique index on column "id"', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = pg_catalog.format('A run walks the table in id order. Add one with: ALTER TABLE %s ADD PRIMARY KEY (id);', tbl);
    END IF;
END
$fn$;

-- One batch: the statement described at the top, plus its fallbacks. Returns the batch's
-- counts and the keyset position to continue from (NULL: no rows left).
--   selector: after_id (keyset: the rows after it, up to an upper bound that covers
--             batch_size rows; NULL = from the start) or ids (exactly these rows).
--   warn_left: how many "unverified" warnings the run may still print.
CREATE FUNCTION @extschema@._pke_batch(
    mode text, tbl regclass, todo int2[], after_id text, ids text[], batch_size integer,
    dry_run boolean, notices boolean, may_commit boolean, warn_left bigint,
    OUT examined bigint, OUT written bigint, OUT previous bigint, OUT unverified bigint,
    OUT errors bigint, OUT warned bigint, OUT changed bigint, OUT last_id text)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
AS $fn$
DECLARE
    lower_sql text := CASE WHEN after_id IS NULL THEN 'true' ELSE 't.id OPERATOR(pg_catalog.>) $1' END;
    range_sql text;
    hi text;
    read_sql text;
    write_sql text;
    one_sql text;
    expr text;
    res record;
    r record;
    ok boolean;
    attempt integer := 0;
    good text[];
    e_state text;
    e_msg text;
    past text := CASE mode WHEN 'encrypt' THEN 'Encrypted' WHEN 'decrypt' THEN 'Decrypted' ELSE 'Re-encrypted' END;
    verb text := CASE mode WHEN 'encrypt' THEN 'encrypt' WHEN 'decrypt' THEN 'decrypt' ELSE 're-encrypt' END;
BEGIN
    examined := 0; written := 0; previous := 0; unverified := 0; errors := 0; warned := 0; changed := 0;
    IF ids IS NULL THEN
        -- The batch's upper bound: the batch_size-th id after after_id (deleted rows count),
        -- or the last id. Fixing it first lets every statement of this batch, fallbacks
        -- included, work on exactly the same range.
        EXECUTE pg_catalog.format($q$
            SELECT COALESCE(
                (SELECT t.id::text FROM %1$s t WHERE %2$s ORDER BY t.id OFFSET $2 - 1 LIMIT 1),
                (SELECT pg_catalog.max(t.id)::text FROM %1$s t WHERE %2$s)) $q$, tbl, lower_sql)
            INTO hi USING after_id, batch_size;
        IF hi IS NULL THEN
            last_id := NULL;  -- nothing after after_id: the run is done
            RETURN;
        END IF;
    END IF;
    expr := CASE mode
        WHEN 'encrypt' THEN '@extschema@.encrypt_token(t.token)'
        WHEN 'decrypt' THEN '@extschema@.decrypt_token(t.token)'
        ELSE '@extschema@._pke_reencrypt(t.token)' END;
    -- one row, compare-and-set, for probing
    one_sql := pg_catalog.format($q$
        UPDATE %1$s t SET token = %2$s
         WHERE t.id::text = $1 AND t.token::text = $2 AND t.status IS DISTINCT FROM 'deleted' $q$,
        tbl, expr);

    LOOP
        attempt := attempt + 1;
        -- the rows of this attempt: the keyset range, or exactly the ids left to retry
        range_sql := CASE WHEN ids IS NOT NULL THEN 't.id::text OPERATOR(pg_catalog.=) ANY ($3)'
                          ELSE lower_sql || ' AND t.id OPERATOR(pg_catalog.<=) $7' END;
        read_sql := pg_catalog.format($q$
            SELECT t.id::text AS id, t.token::text AS token, t.provider::text AS provider,
                   @extschema@._pke_token_state(t.token) AS state
              FROM %1$s t
             WHERE %2$s AND t.status IS DISTINCT FROM 'deleted'
             ORDER BY t.id $q$, tbl, range_sql);
        -- One statement: the UPDATE writes the rows of the range this mode changes, choosing them
        -- by their state; the read beside it (same snapshot) counts every row of the range. If
        -- the application changes a row after our snapshot, the UPDATE waits for it and
        -- re-checks the new version (EvalPlanQual): a new plaintext is encrypted as the
        -- application wrote it, a token or a soft delete is left alone. Nothing is overwritten
        -- with a value computed from an old one.
        write_sql := pg_catalog.format($q$
            WITH written AS (%3$s)
            SELECT a.*, w.*
              FROM (SELECT pg_catalog.count(*) AS examined,
                           pg_catalog.count(*) FILTER (WHERE x.s = ANY ($4)) AS todo,
                           pg_catalog.count(*) FILTER (WHERE x.s = 2) AS previous,
                           pg_catalog.count(*) FILTER (WHERE x.s = 3) AS unverified,
                           -- only while the run may still print warnings about them
                           pg_catalog.array_agg(x.id::text ORDER BY x.id) FILTER (WHERE x.s = 3 AND $6) AS unverified_ids,
                           pg_catalog.array_agg(x.provider ORDER BY x.id) FILTER (WHERE x.s = 3 AND $6) AS unverified_providers,
                           pg_catalog.max(x.id)::text AS last_id
                      FROM (SELECT t.id, t.provider::text AS provider, @extschema@._pke_token_state(t.token) AS s
                              FROM %1$s t
                             WHERE %2$s AND t.status IS DISTINCT FROM 'deleted') x) a,
                   (SELECT pg_catalog.count(*) AS written,
                           pg_catalog.array_agg(w.id ORDER BY w.id) FILTER (WHERE $5) AS written_ids,
                           pg_catalog.array_agg(w.provider ORDER BY w.id) FILTER (WHERE $5) AS written_providers
                      FROM written w) w $q$,
            tbl, range_sql,
            CASE WHEN dry_run
                 -- dry run: report what the UPDATE would write, write nothing
                 THEN pg_catalog.format($w$
                      SELECT t.id::text AS id, t.provider::text AS provider FROM %1$s t
                       WHERE %2$s AND t.status IS DISTINCT FROM 'deleted'
                         AND @extschema@._pke_token_state(t.token) = ANY ($4) $w$, tbl, range_sql)
                 ELSE pg_catalog.format($w$
                      UPDATE %1$s t SET token = %3$s
                       WHERE %2$s AND t.status IS DISTINCT FROM 'deleted'
                         AND @extschema@._pke_token_state(t.token) = ANY ($4)
                      RETURNING t.id::text AS id, t.provider::text AS provider $w$, tbl, range_sql, expr) END);
        ok := false;
        IF may_commit OR dry_run THEN
            -- the common case: one savepoint around the whole batch, then the caller commits
            BEGIN
                EXECUTE write_sql INTO res USING after_id, batch_size, ids, todo, notices, warn_left > 0, hi;
                ok := true;
            EXCEPTION WHEN OTHERS THEN
                ok := false;
            END;
        ELSE
            -- inside the caller's transaction: try in a savepoint that is always rolled
            -- back, then write for real at the caller's level (no written subtransaction)
            BEGIN
                EXECUTE write_sql INTO res USING after_id, batch_size, ids, todo, notices, warn_left > 0, hi;
                RAISE SQLSTATE 'PK000';
            EXCEPTION
                WHEN SQLSTATE 'PK000' THEN ok := true;
                WHEN OTHERS THEN ok := false;
            END;
            IF ok THEN
                EXECUTE write_sql INTO res USING after_id, batch_size, ids, todo, notices, warn_left > 0, hi;
            END IF;
        END IF;
        EXIT WHEN ok;

        IF attempt >= 3 THEN
            -- Rows that pass alone keep failing together (a statement-level trigger, a
            -- constraint between rows): leave them unchanged for this run rather than loop.
            FOR r IN EXECUTE read_sql USING after_id, batch_size, ids, todo, notices, false, hi LOOP
                examined := examined + 1;
                IF r.state = ANY (todo) THEN
                    errors := errors + 1;
                    RAISE WARNING 'Failed to % provider key % for provider %: its write fails only together with other rows; left unchanged',
                        verb, r.id, r.provider;
                ELSIF r.state = 2 THEN
                    previous := previous + 1;
                ELSIF r.state = 3 THEN
                    unverified := unverified + 1;
                END IF;
            END LOOP;
            last_id := COALESCE(hi, last_id);
            RETURN;
        END IF;

        -- The batch failed. Probe each row it would write in a savepoint that is always
        -- rolled back; report the failing rows; retry the batch with exactly the others.
        good := ARRAY[]::text[];
        FOR r IN EXECUTE read_sql USING after_id, batch_size, ids, todo, notices, false, hi LOOP
            IF r.state = ANY (todo) THEN
                BEGIN
                    EXECUTE one_sql USING r.id, r.token;
                    RAISE SQLSTATE 'PK000';
                EXCEPTION
                    WHEN SQLSTATE 'PK000' THEN
                        good := good OPERATOR(pg_catalog.||) r.id;
                    WHEN OTHERS THEN
                        GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_msg = MESSAGE_TEXT;
                        examined := examined + 1;
                        errors := errors + 1;
                        RAISE WARNING 'Failed to % provider key % for provider % (SQLSTATE %): %',
                            verb, r.id, r.provider, e_state, @extschema@._pke_scrub(e_msg, r.token);
                END;
            ELSE
                good := good OPERATOR(pg_catalog.||) r.id;  -- counted when the retry reads it
            END IF;
        END LOOP;
        ids := good;
    END LOOP;

    examined := examined + res.examined;
    written := res.written;
    previous := previous + res.previous;
    unverified := unverified + res.unverified;
    -- rows this batch meant to write that the application changed or deleted first
    changed := CASE WHEN dry_run THEN 0 ELSE res.todo - res.written END;
    -- the keyset position: the batch's upper bound (its last rows may all be deleted)
    last_id := COALESCE(hi, res.last_id);

    IF res.unverified > 0 AND warn_left > 0 THEN
        FOR r IN SELECT * FROM unnest(res.unverified_ids, res.unverified_providers) AS u(id, provider)
                 LIMIT warn_left LOOP
            warned := warned + 1;
            IF mode = 'encrypt' AND 3 = ANY (todo) THEN
                RAISE WARNING 'Provider key % for provider % looks like a token but authenticates under no configured key: % it as plaintext',
                    r.id, r.provider, CASE WHEN dry_run THEN 'would encrypt' ELSE 'encrypted' END
                    USING HINT = 'If it is a token written under another key, check ENCRYPTION_KEY and provider_keys_encrypt.previous_keys; decrypt_provider_keys() gives the stored value back unchanged.';
            ELSE
                RAISE WARNING 'Provider key % for provider % looks like a token but authenticates under no configured key: left unchanged',
                    r.id, r.provider;
            END IF;
        END LOOP;
    END IF;

    IF notices AND res.written > 0 THEN
        FOR r IN SELECT * FROM unnest(res.written_ids, res.written_providers) AS u(id, provider) LOOP
            RAISE NOTICE '% provider key % for provider %',
                CASE WHEN dry_run THEN 'Would ' || verb ELSE past END, r.id, r.provider;
        END LOOP;
    END IF;
END
$fn$;

-- The run: validation, banner, batches, commits, progress, summary.
CREATE PROCEDURE @extschema@._pke_run(
    mode text, table_name regclass, batch_size integer, dry_run boolean, notices boolean,
    encrypt_unverified boolean)
LANGUAGE plpgsql
AS $proc$
DECLARE
    may_commit boolean := @extschema@._pke_may_commit();
    job text := CASE mode WHEN 'encrypt' THEN 'encryption migration' WHEN 'decrypt' THEN 'decryption' ELSE 're-encryption' END;
    done_word text := CASE mode WHEN 'encrypt' THEN 'encrypted' WHEN 'decrypt' THEN 'decrypted' ELSE 'reencrypted' END;
    todo int2[];
    fp text;
    found_rows bigint;
    b record;
    after_id text := NULL;
    n_total bigint := 0; n_written bigint := 0; n_errors bigint := 0; n_previous bigint := 0;
    n_unverified bigint := 0; n_concurrent bigint := 0; n_warned bigint := 0;
    warn_limit constant bigint := 100;
    t0 timestamptz := pg_catalog.clock_timestamp();
    last_progress timestamptz := pg_catalog.clock_timestamp();
    elapsed double precision;
    rate double precision;
    summary text;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 OR batch_size > 100000 THEN
        RAISE EXCEPTION 'batch_size must be between 1 and 100000'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dry_run IS NULL OR notices IS NULL OR encrypt_unverified IS NULL THEN
        RAISE EXCEPTION 'dry_run, verbose and encrypt_unverified must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- Everything global is checked before any row is read or written.
    table_name := @extschema@._pke_table(table_name);
    PERFORM @extschema@._pke_check_table(table_name, NOT dry_run);
    fp := @extschema@.provider_keys_encrypt_fingerprint();  -- raises when no usable key
    todo := CASE mode
        WHEN 'encrypt' THEN CASE WHEN encrypt_unverified THEN '{0,3}'::int2[] ELSE '{0}'::int2[] END
        WHEN 'decrypt' THEN '{1,2}'::int2[]
        ELSE '{2}'::int2[] END;

    RAISE NOTICE 'Starting provider key % on % (key fingerprint %, batch size %)',
        job, table_name, fp, batch_size ||
        CASE WHEN dry_run THEN ', dry run: nothing will be written'
             WHEN NOT may_commit THEN ', inside the caller''s transaction'
             ELSE '' END;
    EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM %s WHERE status IS DISTINCT FROM ''deleted''', table_name)
        INTO found_rows;
    RAISE NOTICE 'Found % provider keys to check', found_rows;

    LOOP
        b := @extschema@._pke_batch(mode, table_name, todo, after_id, NULL, batch_size,
                                    dry_run, notices, may_commit, warn_limit - n_warned);
        EXIT WHEN b.last_id IS NULL;
        after_id := b.last_id;
        n_total := n_total + b.examined;
        n_written := n_written + b.written;
        n_errors := n_errors + b.errors;
        n_previous := n_previous + b.previous;
        n_unverified := n_unverified + b.unverified;
        n_warned := n_warned + b.warned;
        n_concurrent := n_concurrent + b.changed;

        IF may_commit AND NOT dry_run THEN
            -- A crash can only lose batches a re-run redoes; the final commit is synchronous
            -- and flushes these too.
            PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);
            COMMIT;
        END IF;

        IF pg_catalog.clock_timestamp() - last_progress >= interval '5 seconds' THEN
            last_progress := pg_catalog.clock_timestamp();
            elapsed := GREATEST(extract(epoch FROM last_progress - t0), 0.001);
            rate := n_total / elapsed;
            RAISE NOTICE 'Progress: %/% provider keys checked (%), % rows/s, ETA % s',
                n_total, found_rows,
                CASE WHEN found_rows > 0 THEN pg_catalog.round(100.0 * n_total / found_rows, 1) ELSE 100 END || '%',
                pg_catalog.round(rate::numeric),
                CASE WHEN rate > 0 THEN pg_catalog.round((GREATEST(found_rows - n_total, 0) / rate)::numeric) END;
        END IF;
    END LOOP;

    IF n_unverified > n_warned THEN
        RAISE WARNING '% more provider keys look like tokens but authenticate under no configured key (warnings stopped after %)',
            n_unverified - n_warned, warn_limit;
    END IF;

    summary := pg_catalog.format('total=%s, %s=%s, skipped=%s, errors=%s',
        n_total, done_word, n_written, n_total - n_written - n_errors, n_errors);
    IF n_unverified > 0 THEN
        summary := summary || ', unverified=' || n_unverified;
    END IF;
    IF n_previous > 0 AND mode <> 'reencrypt' THEN
        summary := summary || ', previous_key=' || n_previous;
    END IF;
    IF n_concurrent > 0 THEN
        summary := summary || ', changed_concurrently=' || n_concurrent;
    END IF;
    summary := pg_catalog.format('Provider key %s %s: %s',
        job, CASE WHEN dry_run THEN 'dry run completed (nothing was written)' ELSE 'completed' END, summary);
    IF n_errors > 0 THEN
        RAISE WARNING '%', summary
            USING HINT = 'The rows named above were left unchanged; fix them and run the procedure again (it skips what is done).';
    ELSE
        RAISE NOTICE '%', summary;
    END IF;
END
$proc$;

-- The three procedures users call: same arguments, same reporting, same safety.

CREATE PROCEDURE @extschema@.encrypt_provider_keys(
    table_name regclass DEFAULT NULL,  -- NULL: provider_key, found through search_path
    batch_size integer DEFAULT 5000,  -- rows per batch (and per transaction outside a block)
    dry_run boolean DEFAULT false,
    verbose boolean DEFAULT true,
    encrypt_unverified boolean DEFAULT true)
LANGUAGE plpgsql
AS $proc$
BEGIN
    CALL @extschema@._pke_run('encrypt', encrypt_provider_keys.table_name, encrypt_provider_keys.batch_size, encrypt_provider_keys.dry_run, encrypt_provider_keys.verbose, encrypt_provider_keys.encrypt_unverified);
END
$proc$;

COMMENT ON PROCEDURE @extschema@.encrypt_provider_keys(regclass, integer, boolean, boolean, boolean) IS
'Encrypt, in place, every plaintext token of a provider_key table whose status is not ''deleted''. Idempotent; commits every batch_size rows when called outside a transaction block.';

CREATE PROCEDURE @extschema@.decrypt_provider_keys(
    table_name regclass DEFAULT NULL,  -- NULL: provider_key, found through search_path
    batch_size integer DEFAULT 5000,  -- rows per batch (and per transaction outside a block)
    dry_run boolean DEFAULT false,
    verbose boolean DEFAULT true)
LANGUAGE plpgsql
AS $proc$
BEGIN
    CALL @extschema@._pke_run('decrypt', decrypt_provider_keys.table_name, decrypt_provider_keys.batch_size, decrypt_provider_keys.dry_run, decrypt_provider_keys.verbose, false);
END
$proc$;

COMMENT ON PROCEDURE @extschema@.decrypt_provider_keys(regclass, integer, boolean, boolean) IS
'Rollback of encrypt_provider_keys: turn every token (under the current or a previous key) back into its plaintext.';

CREATE PROCEDURE @extschema@.reencrypt_provider_keys(
    table_name regclass DEFAULT NULL,  -- NULL: provider_key, found through search_path
    batch_size integer DEFAULT 5000,  -- rows per batch (and per transaction outside a block)
    dry_run boolean DEFAULT false,
    verbose boolean DEFAULT true)
LANGUAGE plpgsql
AS $proc$
BEGIN
    CALL @extschema@._pke_run('reencrypt', reencrypt_provider_keys.table_name, reencrypt_provider_keys.batch_size, reencrypt_provider_keys.dry_run, reencrypt_provider_keys.verbose, false);
END
$proc$;

COMMENT ON PROCEDURE @extschema@.reencrypt_provider_keys(regclass, integer, boolean, boolean) IS
'Key rotation: re-encrypt under the current key every token written under a key in provider_keys_encrypt.previous_keys.';

-- The seed guide's "verify all keys are encrypted by checking the database", in one query.
CREATE FUNCTION @extschema@.provider_keys_encryption_report(
    table_name regclass DEFAULT NULL,  -- NULL: provider_key, found through search_path
    by_provider boolean DEFAULT false)
RETURNS TABLE (provider text, state text, keys bigint)
LANGUAGE plpgsql STABLE PARALLEL UNSAFE
AS $fn$
DECLARE
    tbl regclass := @extschema@._pke_table(table_name);
BEGIN
    PERFORM @extschema@._pke_check_table(tbl, false);
    PERFORM @extschema@.provider_keys_encrypt_fingerprint();  -- a clear error when no key
    RETURN QUERY EXECUTE pg_catalog.format($q$
        WITH classified AS (
            SELECT CASE WHEN $1 THEN t.provider::text END AS provider,
                   CASE WHEN t.status IS NOT DISTINCT FROM 'deleted' THEN 5
                        ELSE @extschema@._pke_token_state(t.token) + 1 END AS s
              FROM %s t),
        counted AS (
            SELECT c.provider, c.s, pg_catalog.count(*) AS n FROM classified c GROUP BY 1, 2),
        states(s, name) AS (
            VALUES (1, 'plaintext'), (2, 'current_key'), (3, 'previous_key'),
                   (4, 'undecryptable'), (5, 'deleted'))
        SELECT p.provider, st.name, COALESCE(c.n, 0)::bigint
          FROM (SELECT DISTINCT counted.provider FROM counted
                UNION SELECT NULL::text WHERE NOT $1) p
         CROSS JOIN states st
          LEFT JOIN counted c ON c.provider IS NOT DISTINCT FROM p.provider AND c.s = st.s
         WHERE NOT $1 OR c.n IS NOT NULL
         ORDER BY p.provider NULLS FIRST, st.s $q$, tbl)
    USING by_provider;
END
$fn$;

COMMENT ON FUNCTION @extschema@.provider_keys_encryption_report(regclass, boolean) IS
'Counts of keys per state (plaintext, current_key, previous_key, undecryptable, deleted), optionally per provider.';
