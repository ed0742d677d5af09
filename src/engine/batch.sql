-- One batch. A run walks the table in id order, batch_size rows at a time (keyset pagination
-- on the unique index on id: memory stays flat, each batch is an index range scan), and each
-- batch is ONE statement (batch_sql):
--
--   a : the batch's rows (after the previous batch's last id, in id order, LIMIT batch_size;
--       soft-deleted rows included, so the position always advances), each classified ONCE
--       (the format's state_sql: pke_internal.token_state or pke_internal.llmgw_state, in
--       Rust), aggregated in the same pass into the counts and
--       the ids of the rows whose state the mode writes;
--   w : the UPDATE of the same id range, of the rows in a state the mode writes (skipped
--       outright when a found none);
--   and the counts over a and w, in the statement's one snapshot.
--
-- No lost update: if the application changes a row after the statement's snapshot, the UPDATE
-- waits for it and re-checks its conditions on the new version (EvalPlanQual): the row is
-- written only if its new version is still in a state the mode writes, and the new token is
-- computed from that version. A new plaintext is encrypted as the application wrote it; a
-- token or a soft delete is left alone and counted as changed_concurrently. Rows that were
-- not to be written in the snapshot are not touched (a concurrent plaintext write there is
-- the guard's job, or the next run's). The UPDATE finds its rows by their id range (a's first
-- to a's last id: one index descent per batch; both bounds, so that the planner's estimate is
-- a range's, not a third of the table's), and in that range exactly the rows a chose: same
-- snapshot, same classification. Not by a list of ids (one
-- B-tree descent per row, and a sort of the list: about 30 collation-aware comparisons per
-- row, a quarter of the CALL's time over a bare UPDATE on a 300k-row profile), and not by
-- ctid: on a concurrent update, PostgreSQL up to 16 re-checks a TID scan as matching while
-- newer releases re-check the TID itself, so a ctid join would behave differently across
-- versions.
--
-- Failures and subtransactions. A row whose write raises (a trigger, a constraint) must be
-- rolled back alone. Catching an error needs a subtransaction, and more than 64 committed
-- subtransactions with an XID in one open transaction overflow this backend's cache, which
-- makes every snapshot on the server "suboverflowed" (slow). Aborted subtransactions leave
-- the cache, so the engine only ever keeps committed ones it can count (batch_apply):
--   may commit (outside a transaction block) or dry run: the statement runs in one
--       savepoint, then the procedure COMMITs: at most one written subtransaction per
--       transaction;
--   inside a transaction block: the statement is first tried in a savepoint that is always
--       rolled back, then run for real at the caller's level: no written subtransaction, at
--       twice the work per row;
--   a batch that fails: every row it would write is probed in its own savepoint that is
--       always rolled back (batch_isolate); failing rows get a WARNING and count as errors;
--       the statement runs again on exactly the rows that passed.

-- The batch statement for a mode, a table and a range. Parameters: $1 after_id text,
-- $2 batch_size integer, $3 ids text[], $4 todo token_state[], $5 list the written rows,
-- $6 list the unverified rows, $7 the states a written row must end in. verify: the table has
-- triggers that could store something else than what the run wrote, so each written row's
-- stored value is classified again (RETURNING) and counted as written only if it is what the
-- mode promises.
--   a: one pass over the batch's rows in id order (an index range scan, LIMIT batch_size),
--      classifying each row once and aggregating at once: the counts, the keyset position,
--      and the ids of the rows to write (no per-row tuplestore);
--   w: the UPDATE of the rows to write in the same range, re-checked by PostgreSQL on
--      concurrent change. The ids to write are collected only for a dry run, which lists them
--      instead of writing.
CREATE FUNCTION pke_internal.batch_sql(m pke_internal.mode, tbl regclass, range_sql text, dry_run boolean, verify boolean)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN format($q$
    WITH a AS MATERIALIZED (
        SELECT count(c.s) AS examined,
               count(*) FILTER (WHERE c.s = ANY ($4)) AS todo,
               count(*) FILTER (WHERE c.s = 'previous_key') AS previous,
               count(*) FILTER (WHERE c.s = 'unverified') AS unverified,
               array_agg(c.key) FILTER (WHERE c.s = 'unverified' AND $6) AS unverified_ids,
               array_agg(c.provider) FILTER (WHERE c.s = 'unverified' AND $6) AS unverified_providers,
               min(c.key) AS first_id,
               max(c.key) AS last_id,
               array_agg(c.key) FILTER (WHERE c.s = ANY ($4) AND %6$s) AS todo_ids,
               array_agg(c.provider) FILTER (WHERE c.s = ANY ($4) AND %6$s AND $5) AS todo_providers
          FROM (SELECT t.id, t.id::text AS key, t.provider::text AS provider,
                       CASE WHEN %3$s THEN NULL ELSE %4$s END AS s
                  FROM %1$s t
                 WHERE %2$s
                 ORDER BY t.id
                 LIMIT $2) c),
    w AS (%5$s)
    SELECT a.examined, a.todo, a.previous, a.unverified, a.unverified_ids, a.unverified_providers, a.last_id,
           w.written, w.written_ids, w.written_providers, w.overridden_ids, w.overridden_providers, w.landed_ids
      FROM a,
           (SELECT count(*) FILTER (WHERE w.landed) AS written,
                   array_agg(w.key ORDER BY w.key) FILTER (WHERE w.landed AND $5) AS written_ids,
                   array_agg(w.provider ORDER BY w.key) FILTER (WHERE w.landed AND $5) AS written_providers,
                   array_agg(w.key ORDER BY w.key) FILTER (WHERE NOT w.landed) AS overridden_ids,
                   array_agg(w.provider ORDER BY w.key) FILTER (WHERE NOT w.landed) AS overridden_providers,
                   array_agg(w.key) FILTER (WHERE w.landed AND %7$s) AS landed_ids
              FROM w) w $q$,
    tbl, range_sql, m.deleted_sql, m.state_sql,
    CASE WHEN dry_run
         -- a dry run reports what the UPDATE would write, and writes nothing
         THEN 'SELECT u.key, u.provider, true AS landed FROM a, unnest(a.todo_ids, a.todo_providers) AS u(key, provider)'
         ELSE format($w$
            UPDATE %1$s t SET %2$s
             WHERE (SELECT a.todo FROM a) > 0 AND %6$s
               AND t.id >= (SELECT a.first_id FROM a) AND t.id <= (SELECT a.last_id FROM a)
               AND NOT (%3$s) AND %4$s = ANY ($4)
            RETURNING t.id::text AS key, t.provider::text AS provider, %5$s AS landed $w$,
            tbl, m.set_sql, m.deleted_sql, m.state_sql,
            CASE WHEN verify THEN format('(%s) = ANY ($7)', m.state_sql) ELSE 'true' END,
            range_sql) END,
    CASE WHEN dry_run THEN 'true' ELSE 'false' END,
    CASE WHEN verify AND NOT dry_run THEN 'true' ELSE 'false' END);

-- The rows of a batch: after after_id (NULL: from the start), or exactly the ids given.
CREATE FUNCTION pke_internal.batch_range(after_id text, ids text[])
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN ids IS NOT NULL THEN 't.id::text = ANY ($3)'
            WHEN after_id IS NULL THEN 'true'
            ELSE 't.id > $1' END;

-- Run the batch statement with the savepoint strategy described at the top. NULL: it raised,
-- and nothing of it is left.
-- Could a trigger of the table store something else than what the run writes? (Enabled
-- triggers other than the extension's own guard, in the table or a partition.)
CREATE FUNCTION pke_internal.table_may_rewrite(tbl regclass)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN EXISTS (
    WITH RECURSIVE tree(oid) AS (
        SELECT tbl::oid
        UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
    SELECT 1 FROM tree JOIN pg_trigger tg ON tg.tgrelid = tree.oid
     WHERE NOT tg.tgisinternal AND tg.tgenabled <> 'D'
       AND NOT EXISTS (SELECT 1 FROM pg_depend e
                        WHERE e.classid = 'pg_proc'::regclass AND e.objid = tg.tgfoid AND e.deptype = 'e'
                          AND e.refobjid = (SELECT x.oid FROM pg_extension x WHERE x.extname = 'provider_keys_encrypt')));

-- After the batch statement, on a table whose triggers could store something else: the rows it
-- wrote, classified again by a later statement, so after the AFTER triggers (and, with
-- constraints set IMMEDIATE, the deferred ones) have run. A row that is no longer in a state
-- the mode promises was written back by one of them: it is an error, named by id, not a row
-- done. (The RETURNING check in the statement catches BEFORE triggers; run_verify's final scan
-- catches everything, without names.)
CREATE FUNCTION pke_internal.batch_recheck(m pke_internal.mode, tbl regclass, r pke_internal.batch_rows)
RETURNS pke_internal.batch_rows
LANGUAGE plpgsql STABLE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    late_ids text[];
    late_providers text[];
BEGIN
    IF r.landed_ids IS NULL THEN
        RETURN r;
    END IF;
    EXECUTE format('SELECT array_agg(t.id::text ORDER BY t.id), array_agg(t.provider::text ORDER BY t.id)
                      FROM %s t WHERE t.id::text = ANY ($1) AND NOT coalesce((%s) = ANY ($2), false)',
                   tbl, m.state_sql)
        INTO late_ids, late_providers USING r.landed_ids, m.target;
    IF late_ids IS NOT NULL THEN
        r.written := r.written - cardinality(late_ids);
        r.overridden_ids := coalesce(r.overridden_ids, '{}') || late_ids;
        r.overridden_providers := coalesce(r.overridden_providers, '{}') || late_providers;
        IF r.written_ids IS NOT NULL THEN
            SELECT array_agg(u.key ORDER BY u.o), array_agg(u.prov ORDER BY u.o)
              INTO r.written_ids, r.written_providers
              FROM unnest(r.written_ids, r.written_providers) WITH ORDINALITY AS u(key, prov, o)
             WHERE u.key <> ALL (late_ids);
        END IF;
    END IF;
    r.landed_ids := NULL;
    RETURN r;
END
$fn$;

-- The deferrable constraints of the table and its partitions (constraint triggers included),
-- as a SET CONSTRAINTS list; NULL when it has none.
CREATE FUNCTION pke_internal.deferrable_constraints(tbl regclass)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH RECURSIVE tree(oid) AS (
        SELECT tbl::oid
        UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
    SELECT string_agg(DISTINCT format('%I.%I', n.nspname, c.conname), ', ')
      FROM tree JOIN pg_constraint c ON c.conrelid = tree.oid
      JOIN pg_namespace n ON n.oid = c.connamespace
     WHERE c.condeferrable
$fn$;

-- The batch of `job` (a run: its mode, format, table, position, size, dry_run, may_commit)
-- after job.after_id, or only the rows `ids` when given. write_none: only count the rows (the
-- mode's todo emptied), for a batch given up on. list_written, list_unverified: return those
-- rows' ids and providers, for the messages.
CREATE FUNCTION pke_internal.batch_apply(
    job pke_internal.run, ids text[], write_none boolean, list_written boolean, list_unverified boolean)
RETURNS pke_internal.batch_rows
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(job.mode, job.format, job.encrypt_unverified, job.tbl);
    tbl constant regclass := job.tbl;
    after_id constant text := job.after_id;
    dry_run constant boolean := job.dry_run;
    may_commit constant boolean := job.may_commit;
    todo pke_internal.token_state[] := CASE WHEN write_none THEN '{}' ELSE m.todo END;
    stmt text := pke_internal.batch_sql(m, tbl, pke_internal.batch_range(after_id, ids), dry_run OR write_none,
                                        pke_internal.table_may_rewrite(tbl));
    r pke_internal.batch_rows;
    ok boolean;
    deferred_list text := CASE WHEN NOT (may_commit OR dry_run) THEN pke_internal.deferrable_constraints(tbl) END;
BEGIN
    -- Deferred checks (a DEFERRABLE INITIALLY DEFERRED unique or exclusion constraint, a
    -- deferrable constraint trigger) would fire at COMMIT, outside every savepoint here, and
    -- their message (a unique violation's DETAIL: the key value) would reach the client and
    -- the server log unscrubbed. SET CONSTRAINTS ALL IMMEDIATE inside the savepoint makes
    -- them fire at the end of the batch statement, inside it: a failure is caught and its
    -- rows are isolated. The mode lasts as long as its savepoint: restored when it is rolled
    -- back (the trial below), kept when it is released (a batch that may commit: up to the
    -- COMMIT that follows; the next transaction starts with each constraint's own mode).
    -- A dry run and write_none write nothing, and their savepoint is released in the
    -- caller's transaction too: they leave the mode alone.
    IF may_commit OR dry_run THEN
        -- one savepoint around the whole batch; the caller commits
        BEGIN
            IF NOT (dry_run OR write_none) THEN
                SET CONSTRAINTS ALL IMMEDIATE;
            END IF;
            EXECUTE stmt INTO r USING after_id, job.batch_size, ids, todo, list_written, list_unverified, m.target;
            r := pke_internal.batch_recheck(m, tbl, r);
            ok := true;
        EXCEPTION WHEN OTHERS THEN
            ok := false;
        END;
    ELSE
        -- inside the caller's transaction: try in a savepoint that is always rolled back,
        -- then write for real at the caller's level (no written subtransaction is kept).
        -- The trial runs the deferred checks (its mode is rolled back with it; run_start
        -- refused to start while the caller's own pending checks failed). The real write sets
        -- the table's own deferrable constraints IMMEDIATE for the rest of the caller's
        -- transaction: what they do (a deferred trigger that writes the old value back) then
        -- happens inside the run, where batch_recheck and run_verify see it, instead of at the
        -- caller's COMMIT, after the run has said "completed".
        BEGIN
            IF NOT write_none THEN
                SET CONSTRAINTS ALL IMMEDIATE;
            END IF;
            EXECUTE stmt INTO r USING after_id, job.batch_size, ids, todo, list_written, list_unverified, m.target;
            RAISE SQLSTATE 'PK000';
        EXCEPTION
            WHEN SQLSTATE 'PK000' THEN ok := true;
            WHEN OTHERS THEN ok := false;
        END;
        IF ok THEN
            IF NOT write_none AND deferred_list IS NOT NULL THEN
                EXECUTE format('SET CONSTRAINTS %s IMMEDIATE', deferred_list);
            END IF;
            EXECUTE stmt INTO r USING after_id, job.batch_size, ids, todo, list_written, list_unverified, m.target;
            r := pke_internal.batch_recheck(m, tbl, r);
        END IF;
    END IF;
    RETURN CASE WHEN ok THEN r END;
END
$fn$;

-- Remove a row's secrets from an error message before it is shown: the stored values (in
-- encrypt mode, the plaintext itself, and for llmgw the mask computed from it) and, in a mode
-- that writes plaintext, the decrypted value (batch_isolate computes it with the caller's own EXECUTE on the format's decrypting
-- function, checked before the run started).
CREATE FUNCTION pke_internal.scrub(message text, secrets text[])
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    s text;
BEGIN
    FOREACH s IN ARRAY secrets LOOP
        IF s IS NOT NULL AND s <> '' THEN
            message := replace(message, s, '[redacted]');
        END IF;
    END LOOP;
    RETURN message;
END
$fn$;

-- A batch that failed: probe every row it would write in a savepoint that is always rolled
-- back; return the others, and each failing row with its SQLSTATE and its message (the row's
-- secrets scrubbed) for batch() to report. give_up: rows that pass alone keep failing together
-- (a statement-level trigger, a constraint between rows): report every row to write as
-- failing (SQLSTATE NULL), write none.
CREATE FUNCTION pke_internal.batch_isolate(
    job pke_internal.run, ids text[], give_up boolean,
    OUT good text[], OUT errors bigint, OUT range_end text,
    OUT failed_ids text[], OUT failed_providers text[], OUT failed_states text[], OUT failed_messages text[])
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(job.mode, job.format, job.encrypt_unverified, job.tbl);
    tbl constant regclass := job.tbl;
    one_sql text := format('UPDATE %s t SET %s WHERE t.id::text = $1 AND NOT (%s) AND %s = ANY ($2)',
                           tbl, m.set_sql, m.deleted_sql, m.state_sql);
    x record;
    e_state text;
    e_msg text;
    plain text;
BEGIN
    good := '{}';
    errors := 0;
    failed_ids := '{}'; failed_providers := '{}'; failed_states := '{}'; failed_messages := '{}';
    FOR x IN EXECUTE format(
        'SELECT t.id::text AS key, %s AS stored, t.provider::text AS prov,
                CASE WHEN %s THEN NULL ELSE %s END AS st
           FROM %s t WHERE %s ORDER BY t.id LIMIT $2',
        m.stored_sql, m.deleted_sql, m.state_sql, tbl, pke_internal.batch_range(job.after_id, ids))
        USING job.after_id, job.batch_size, ids
    LOOP
        range_end := x.key;
        IF x.st IS NULL OR NOT x.st = ANY (m.todo) THEN
            good := good || x.key;  -- nothing to write: counted when the batch runs again
        ELSIF give_up THEN
            errors := errors + 1;
            failed_ids := failed_ids || x.key; failed_providers := failed_providers || x.prov;
            failed_states := failed_states || NULL::text; failed_messages := failed_messages || NULL::text;
        ELSE
            BEGIN
                SET CONSTRAINTS ALL IMMEDIATE;  -- deferred checks fail here, not at COMMIT
                EXECUTE one_sql USING x.key, m.todo;
                RAISE SQLSTATE 'PK000';
            EXCEPTION
                WHEN SQLSTATE 'PK000' THEN
                    good := good || x.key;
                WHEN OTHERS THEN
                    GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_msg = MESSAGE_TEXT;
                    errors := errors + 1;
                    plain := NULL;
                    IF m.plain_sql IS NOT NULL THEN
                        BEGIN
                            EXECUTE format('SELECT %s FROM %s t WHERE t.id::text = $1', m.plain_sql, tbl)
                                INTO plain USING x.key;
                        EXCEPTION WHEN OTHERS THEN
                            plain := NULL;
                        END;
                    END IF;
                    failed_ids := failed_ids || x.key; failed_providers := failed_providers || x.prov;
                    failed_states := failed_states || e_state;
                    failed_messages := failed_messages || pke_internal.scrub(e_msg, x.stored || plain);
            END;
        END IF;
    END LOOP;
END
$fn$;

-- The batch's messages: a WARNING per unverified row while the run may still print them, and
-- a NOTICE per written row when verbose. Returns how many warnings it printed.
CREATE FUNCTION pke_internal.batch_messages(m pke_internal.mode, r pke_internal.batch_rows, dry_run boolean, warn_left bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    x record;
    warned bigint := 0;
BEGIN
    IF r.unverified > 0 AND warn_left > 0 THEN
        FOR x IN SELECT * FROM unnest(r.unverified_ids, r.unverified_providers) AS u(key, prov) LIMIT warn_left LOOP
            warned := warned + 1;
            IF 'unverified' = ANY (m.todo) THEN
                RAISE WARNING 'Provider key % for provider % %: % it as plaintext',
                    x.key, x.prov, m.unverified_text, CASE WHEN dry_run THEN 'would encrypt' ELSE 'encrypted' END
                    USING HINT = 'If it is a token written under another key, check ENCRYPTION_KEY and the previous keys; @extschema@.decrypt_provider_keys() gives the stored value back unchanged.';
            ELSE
                RAISE WARNING 'Provider key % for provider % %: left unchanged', x.key, x.prov, m.unverified_text;
            END IF;
        END LOOP;
    END IF;
    IF r.overridden_ids IS NOT NULL AND warn_left - warned > 0 THEN
        FOR x IN SELECT * FROM unnest(r.overridden_ids, r.overridden_providers) AS u(key, prov) LIMIT warn_left - warned LOOP
            warned := warned + 1;
            RAISE WARNING 'Failed to % provider key % for provider %: a trigger stored another value than the one written (its state is not %); counted as an error',
                m.verb, x.key, x.prov, array_to_string(m.target, ' or ');
        END LOOP;
    END IF;
    IF r.written_ids IS NOT NULL THEN
        FOR x IN SELECT * FROM unnest(r.written_ids, r.written_providers) AS u(key, prov) LOOP
            RAISE NOTICE '% provider key % for provider %',
                CASE WHEN dry_run THEN 'Would ' || m.verb ELSE m.past END, x.key, x.prov;
        END LOOP;
    END IF;
    RETURN warned;
END
$fn$;

-- The next batch of `job` (a run: its mode, format, table, position and options), start to
-- end: apply; if it fails, isolate the failing rows and apply again on the others (at most
-- three attempts); then the messages, at most warn_left warnings.
CREATE FUNCTION pke_internal.batch(job pke_internal.run, warn_left bigint)
RETURNS pke_internal.batch_result
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(job.mode, job.format, job.encrypt_unverified, job.tbl);
    after_id constant text := job.after_id;
    dry_run constant boolean := job.dry_run;
    r pke_internal.batch_rows;
    iso record;
    ids text[];
    range_end text;
    failed bigint := 0;
    f_ids text[] := '{}';
    f_providers text[] := '{}';
    f_states text[] := '{}';
    f_messages text[] := '{}';
    x record;
    warned bigint := 0;
    res pke_internal.batch_result;
BEGIN
    FOR attempt IN 1..3 LOOP
        r := pke_internal.batch_apply(job, ids, write_none => false,
                                      list_written => job.row_notices, list_unverified => warn_left > 0);
        EXIT WHEN r.examined IS NOT NULL;  -- it ran
        iso := pke_internal.batch_isolate(job, ids, give_up => attempt = 3);
        failed := failed + iso.errors;
        f_ids := f_ids || iso.failed_ids; f_providers := f_providers || iso.failed_providers;
        f_states := f_states || iso.failed_states; f_messages := f_messages || iso.failed_messages;
        range_end := COALESCE(range_end, iso.range_end);
        ids := iso.good;
        IF attempt = 3 THEN
            -- count the rows that are left as they are, and write none of them
            r := pke_internal.batch_apply(job, ids, write_none => true,
                                          list_written => false, list_unverified => false);
            IF r.examined IS NULL THEN
                RAISE EXCEPTION 'the provider keys after id % could not be read', after_id
                    USING ERRCODE = 'object_not_in_prerequisite_state';
            END IF;
        END IF;
    END LOOP;

    res.examined := r.examined + failed;
    res.written := r.written;  -- in a dry run: what it would write
    res.previous := r.previous;
    res.unverified := r.unverified;
    res.errors := failed + coalesce(cardinality(r.overridden_ids), 0);
    -- rows this batch meant to write that someone else changed or deleted first
    res.changed := CASE WHEN dry_run THEN 0 ELSE r.todo - r.written - coalesce(cardinality(r.overridden_ids), 0) END;
    res.last_id := COALESCE(range_end, r.last_id);
    -- A condition that fails every row is not a row's problem: when every row the batch was to
    -- write failed, at least 10 of them, all with one SQLSTATE, the run stops with one ERROR
    -- (that SQLSTATE, the first row's scrubbed message) instead of a WARNING per row. Earlier
    -- batches stay committed; this one wrote nothing.
    IF failed >= 10 AND r.written = 0 AND f_states[1] IS NOT NULL
       AND (SELECT count(DISTINCT coalesce(u.s, '')) FROM unnest(f_states) AS u(s)) = 1 THEN
        RAISE EXCEPTION 'every provider key of a batch failed to % the same way (SQLSTATE %): %', m.verb, f_states[1], f_messages[1]
            USING ERRCODE = f_states[1],
                  DETAIL = format('%s rows after id %s failed and none of them was written: the cause is not in a row.',
                                  failed, coalesce(quote_literal(after_id), '(the start)')),
                  HINT = CASE
                      WHEN f_states[1] IN ('42P01', '42883', '42704', '3F000') THEN
                          'During a run the table''s triggers and functions run with search_path = pg_catalog, pg_temp: give each of them the search_path it needs (ALTER FUNCTION ... SET search_path = ...), or write schema-qualified names in them, then run again.'
                      WHEN f_states[1] = '22001' THEN
                          'A token is longer than the key it holds: give the column room (ALTER TABLE ... ALTER COLUMN ... TYPE text), then run again.'
                      ELSE 'Fix the cause, then run again: it skips what is done.' END;
    END IF;
    -- the failing rows, then the rest of the batch's messages, within the run's warning budget
    FOR x IN SELECT * FROM unnest(f_ids, f_providers, f_states, f_messages) AS u(key, prov, st, msg) LIMIT greatest(warn_left, 0) LOOP
        warned := warned + 1;
        IF x.st IS NULL THEN
            RAISE WARNING 'Failed to % provider key % for provider %: its write fails only together with other rows; left unchanged',
                m.verb, x.key, x.prov;
        ELSE
            RAISE WARNING 'Failed to % provider key % for provider % (SQLSTATE %): %', m.verb, x.key, x.prov, x.st, x.msg;
        END IF;
    END LOOP;
    res.warned := warned + pke_internal.batch_messages(m, r, dry_run, warn_left - warned);
    RETURN res;
END
$fn$;
