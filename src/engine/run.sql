-- A run: start (every global check, the banner), steps (one batch each, the progress line),
-- a durable finish, the summary. The procedure that COMMITs between steps (pke_internal.run)
-- cannot carry a SET search_path clause, so it does nothing but call these functions, which
-- do.

-- Everything global is checked here, before any row is read or written: the arguments, the
-- mode and format, the table (the columns the format needs), the privileges, the key, and the
-- guard (may it be installed; for a mode that writes plaintext, is none installed). Then the
-- banner, and the guard is installed when asked for; the caller commits it before run_count
-- counts the rows to check.
CREATE FUNCTION pke_internal.run_start(
    mode_name text, format_name text, tbl regclass, batch_size integer, dry_run boolean,
    notices boolean, encrypt_unverified boolean, guard boolean, may_commit boolean)
RETURNS pke_internal.run
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode;
    r pke_internal.run;
    key_id text;
    notice text;
    writers text;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 OR batch_size > 100000 THEN
        RAISE EXCEPTION 'batch_size must be between 1 and 100000'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dry_run IS NULL OR notices IS NULL OR encrypt_unverified IS NULL OR guard IS NULL THEN
        RAISE EXCEPTION 'dry_run, verbose, encrypt_unverified and guard must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    m := pke_internal.mode(mode_name, format_name, encrypt_unverified, tbl);
    -- a run that writes on a server or in a transaction that cannot: one ERROR now, not a
    -- WARNING per row (a migration script connected to a replica or a read-only endpoint)
    IF NOT dry_run AND pg_is_in_recovery() THEN
        RAISE EXCEPTION 'cannot run the provider key % on a hot standby', m.job
            USING ERRCODE = 'read_only_sql_transaction',
                  DETAIL = 'This server is in recovery (a replica): nothing can be written here.',
                  HINT = 'Connect to the primary server and run it there. Here, a dry run (dry_run => true) and @extschema@.provider_keys_encryption_report() work.';
    END IF;
    IF NOT dry_run AND current_setting('transaction_read_only')::boolean THEN
        RAISE EXCEPTION 'cannot run the provider key % in a read-only transaction', m.job
            USING ERRCODE = 'read_only_sql_transaction',
                  DETAIL = CASE WHEN current_setting('default_transaction_read_only')::boolean
                                THEN 'default_transaction_read_only is on for this session (a read-only endpoint or pooler?).'
                                ELSE 'The transaction block was started READ ONLY.' END,
                  HINT = CASE WHEN current_setting('default_transaction_read_only')::boolean AND NOT may_commit
                                THEN 'End this transaction block and run it in a read-write one (BEGIN READ WRITE), or connect to a read-write endpoint.'
                              WHEN current_setting('default_transaction_read_only')::boolean
                                THEN 'Connect to a read-write endpoint, or run SET default_transaction_read_only = off; before the CALL.'
                              ELSE 'Run it outside the read-only transaction block, or in one started with BEGIN READ WRITE.' END;
    END IF;
    IF guard AND m.reveals IS NOT NULL THEN
        RAISE EXCEPTION 'the guard cannot be installed by a run that writes plaintext'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pke_internal.check_table(tbl, m, NOT dry_run);
    IF guard THEN
        PERFORM pke_internal.guard_check(tbl, m);
    END IF;
    IF m.reveals IS NOT NULL THEN
        -- a mode that reveals plaintext writes it into the table: the guard would undo it
        PERFORM pke_internal.guard_absent(tbl);
    END IF;
    EXECUTE 'SELECT ' || m.key_sql INTO key_id;  -- raises when there is no usable key
    -- Whatever else would fail every row's write the same way (EXECUTE on a function the
    -- statement calls, say) fails here, once: the batch statement is planned and its executor
    -- set up (EXPLAIN checks the privileges on every function it calls), nothing is run.
    IF NOT dry_run THEN
        EXECUTE 'EXPLAIN ' || pke_internal.batch_sql(m, tbl, pke_internal.batch_range(NULL, NULL), false, false)
            USING NULL::text, batch_size, NULL::text[], m.todo, false, false, m.target;
    END IF;
    IF NOT may_commit AND NOT dry_run THEN
        PERFORM pke_internal.pending_checks_pass();
    END IF;

    r.mode := mode_name;
    r.format := format_name;
    r.tbl := tbl;
    r.batch_size := batch_size;
    r.dry_run := dry_run;
    r.row_notices := notices;
    r.encrypt_unverified := encrypt_unverified;
    r.may_commit := may_commit;
    r.do_commit := may_commit AND NOT dry_run;
    r.done := false;
    r.examined := 0; r.written := 0; r.errors := 0; r.previous := 0;
    r.unverified := 0; r.warned := 0; r.changed := 0;
    r.verified := false; r.remaining := 0;
    r.started := clock_timestamp();
    r.last_progress := r.started;

    RAISE NOTICE '%', format('Starting provider key %s on %s (%s %s, batch size %s%s)',
        m.job, tbl, m.key_word, key_id, batch_size,
        CASE WHEN dry_run THEN ', dry run: nothing will be written'
             WHEN NOT may_commit THEN ', inside the caller''s transaction'
             ELSE '' END);
    -- CREATE EXTENSION refused a schema others can write to (types.sql); a GRANT made since
    -- lets them plant an overload of this very procedure that a later call would run instead
    writers := pke_internal.schema_writers();
    IF writers IS NOT NULL THEN
        RAISE WARNING 'schema @extschema@ is writable by roles that are not superusers: %', writers
            USING DETAIL = 'Any of them can create an overload of this procedure (or of the other functions of provider_keys_encrypt) that a call like this one would run instead, with the caller''s rights.',
                  HINT = 'REVOKE CREATE ON SCHEMA @extschema@ from those roles, then look for functions and procedures in @extschema@ that you did not create (\df @extschema@.*provider_key*).';
    END IF;
    IF m.notice_sql IS NOT NULL THEN
        EXECUTE 'SELECT ' || m.notice_sql INTO notice;
        IF notice IS NOT NULL THEN
            RAISE NOTICE '%', notice;
        END IF;
    END IF;
    IF guard THEN
        PERFORM pke_internal.guard_install(tbl, m, dry_run);
    END IF;
    RETURN r;
END
$fn$;

-- Inside the caller's transaction block, a batch runs the deferred checks (deferrable
-- constraints, constraint triggers) in its trial savepoint (batch_apply), and SET CONSTRAINTS
-- ALL IMMEDIATE runs all of them, also those the caller's own earlier statements left
-- pending. If one of those fails, every row of the run would fail with the caller's message,
-- which may hold the caller's values: refuse before the first row instead, naming the
-- constraint only. Checked in a savepoint that is always rolled back: the caller's
-- constraints stay in the mode they were in, their checks still pending.
CREATE FUNCTION pke_internal.pending_checks_pass()
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    e_state text;
    e_constraint text;
BEGIN
    BEGIN
        SET CONSTRAINTS ALL IMMEDIATE;
        RAISE SQLSTATE 'PK000';
    EXCEPTION
        WHEN SQLSTATE 'PK000' THEN
            RETURN;
        WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_constraint = CONSTRAINT_NAME;
    END;
    RAISE EXCEPTION 'a deferred check of this transaction already fails%, before the run wrote anything',
        CASE WHEN e_constraint <> '' THEN format(' (constraint %I)', e_constraint) ELSE '' END
        USING ERRCODE = CASE WHEN e_state LIKE '23%' THEN e_state ELSE 'integrity_constraint_violation' END,
              DETAIL = format('SQLSTATE %s, raised by a change this transaction made before the CALL; its message is not shown, as it may hold a key.', e_state),
              HINT = 'Make the transaction''s earlier changes satisfy their deferred constraints before the CALL, or run the CALL outside a transaction block.';
END
$fn$;

-- The number of rows to check, for the progress line.
CREATE FUNCTION pke_internal.run_count(r pke_internal.run)
RETURNS pke_internal.run
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(r.mode, r.format, r.encrypt_unverified, r.tbl);
BEGIN
    EXECUTE format('SELECT count(*) FROM %s t WHERE NOT (%s)', r.tbl, m.deleted_sql) INTO r.found;
    RAISE NOTICE 'Found % provider keys to check%', r.found, m.found_note;
    RETURN r;
END
$fn$;

-- The rows of the table per state (in the enum's order), soft-deleted rows left out: one
-- sequential scan in a fresh snapshot that classifies each row once. Row security is off, so
-- a policy that applies to the caller makes it fail instead of hiding rows (check_table has
-- refused that already): the counts are over every row of every partition. The four counts
-- are one sum (a simple CASE evaluates the state once, and each state adds 1 in its own 12
-- decimal digits), so the plan may run in parallel: count(*) FILTER per state would classify
-- each row once per FILTER, and a GROUP BY state is planned as if every row were its own group
-- (a function of a unique column), so serially, with a hash table sized for that. No JIT: the
-- scan's cost estimate passes jit_above_cost on a large table, and compiling it (LLVM) adds
-- about 10 MiB to the backend and a compile time that a per-row C call does not win back
-- (measured on 1M rows: the peak memory of a CALL went from 9 to 18 MiB with it).
CREATE FUNCTION pke_internal.state_counts(m pke_internal.mode, tbl regclass)
RETURNS bigint[]
LANGUAGE plpgsql STABLE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
SET row_security = off
SET jit = off
AS $fn$
DECLARE
    digits constant numeric := 1e12;  -- room for any table's count of one state
    total numeric;
BEGIN
    EXECUTE format('SELECT sum(CASE %s WHEN ''plaintext'' THEN 1 WHEN ''current_key'' THEN 1e12
                                       WHEN ''previous_key'' THEN 1e24 WHEN ''unverified'' THEN 1e36
                                       ELSE 0 END)
                      FROM %s t WHERE NOT (%s)',
                   m.state_sql, tbl, m.deleted_sql)
        INTO total;
    total := coalesce(total, 0);
    RETURN ARRAY[mod(total, digits), mod(div(total, digits), digits),
                 mod(div(total, digits ^ 2), digits), div(total, digits ^ 3)]::bigint[];
END
$fn$;

-- How many of those counts are rows in a state the mode writes.
CREATE FUNCTION pke_internal.todo_count(m pke_internal.mode, n bigint[])
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT coalesce(sum(u.n), 0)::bigint
          FROM unnest(enum_range(NULL::pke_internal.token_state), n) AS u(s, n)
         WHERE u.s = ANY (m.todo));

-- After a first batch that had nothing to write or warn about (an all-skipped re-run, most
-- likely): is that true of the whole table? One classification scan (state_counts); when no
-- row is in a state the mode writes and none is unverified, that scan ends the run, with the
-- counts a batch-by-batch walk would find in the same snapshot, at the cost of a plain
-- classification scan instead of a walk by index. It is also the run's verification (every
-- row, after the first batch): run_verify has nothing left to do. Rows written after this
-- snapshot are the guard's job or the next run's, exactly as for rows written behind a walk's
-- position. A first run pays none of this: its first batch has rows to write.
CREATE FUNCTION pke_internal.run_idle_check(r pke_internal.run)
RETURNS pke_internal.run
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(r.mode, r.format, r.encrypt_unverified, r.tbl);
    n bigint[] := pke_internal.state_counts(m, r.tbl);
BEGIN
    IF pke_internal.todo_count(m, n) = 0 AND n[4] = 0 THEN  -- nothing to write, no unverified row to warn about
        r.examined := n[1] + n[2] + n[3] + n[4];
        r.previous := n[3];
        r.done := true;
        r.verified := NOT r.dry_run;
        r.remaining := 0;
    END IF;
    RETURN r;
END
$fn$;

-- After the last batch of a run that wrote (not a dry run): the proof behind "completed". One
-- classification scan of every row (state_counts: every partition, row security off), in a
-- snapshot taken after the last batch's commit, counts the rows still in a state the mode
-- writes. Whatever left them there — a row that failed, a trigger that wrote the old value
-- back after the run's write (an AFTER trigger, a deferred one), a rule, a row written during
-- the run without the guard — the summary says so and does not say "completed".
CREATE FUNCTION pke_internal.run_verify(r pke_internal.run)
RETURNS pke_internal.run
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode;
    n bigint[];
BEGIN
    IF r.dry_run OR r.verified THEN
        RETURN r;
    END IF;
    m := pke_internal.mode(r.mode, r.format, r.encrypt_unverified, r.tbl);
    n := pke_internal.state_counts(m, r.tbl);
    r.remaining := pke_internal.todo_count(m, n);
    r.verified := true;
    RETURN r;
END
$fn$;

-- One step: the next batch, its counts added to the run, a progress line every 5 seconds.
-- When the caller will COMMIT after it, that commit needs no WAL flush (synchronous_commit
-- off): a crash can only lose batches a re-run redoes, and run_finish_durably flushes them
-- all before the run says "completed".
CREATE FUNCTION pke_internal.run_step(r pke_internal.run)
RETURNS pke_internal.run
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    b pke_internal.batch_result;
    warn_limit constant bigint := 100;
    elapsed double precision;
    rate double precision;
    first boolean := r.after_id IS NULL;
BEGIN
    b := pke_internal.batch(r, warn_left => warn_limit - r.warned);
    IF b.last_id IS NULL THEN
        r.done := true;
        RETURN r;
    END IF;
    r.after_id := b.last_id;
    r.examined := r.examined + b.examined;
    r.written := r.written + b.written;
    r.errors := r.errors + b.errors;
    r.previous := r.previous + b.previous;
    r.unverified := r.unverified + b.unverified;
    r.warned := r.warned + b.warned;
    r.changed := r.changed + b.changed;
    IF first AND b.written = 0 AND b.errors = 0 AND b.unverified = 0 AND b.changed = 0 THEN
        r := pke_internal.run_idle_check(r);
        IF r.done THEN
            RETURN r;
        END IF;
    END IF;
    IF r.do_commit THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF clock_timestamp() - r.last_progress >= interval '5 seconds' THEN
        r.last_progress := clock_timestamp();
        elapsed := greatest(extract(epoch FROM r.last_progress - r.started), 0.001);
        rate := r.examined / elapsed;
        RAISE NOTICE '%', format('Progress: %s/%s provider keys checked (%s%%), %s rows/s, ETA %s s',
            r.examined, r.found,
            CASE WHEN r.found > 0 THEN round(100.0 * r.examined / r.found, 1) ELSE 100 END,
            round(rate::numeric),
            CASE WHEN rate > 0 THEN round((greatest(r.found - r.examined, 0) / rate)::numeric) END);
    END IF;
    RETURN r;
END
$fn$;

-- Before a run that committed as it went says "completed": flush the WAL up to now. Every
-- batch's commit (made with synchronous_commit off) is then on disk, so everything the
-- summary counts survives a crash.
CREATE FUNCTION pke_internal.run_finish_durably(r pke_internal.run)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF r.do_commit AND (r.written > 0 OR r.errors > 0) THEN
        PERFORM pke_internal.flush_wal();
    END IF;
END
$fn$;

-- The summary: total = done + skipped + errors, and what else the operator must know. It says
-- "completed" only when run_verify's scan after the last batch found no row left in a state
-- the mode writes (or, for an all-skipped run, the idle check's scan did): never on counting
-- alone, which a trigger that writes the old value back, or a row written during the run,
-- would fool. Otherwise the run is "incomplete", with remaining=N and a WARNING.
CREATE FUNCTION pke_internal.run_summary(r pke_internal.run)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(r.mode, r.format, r.encrypt_unverified, r.tbl);
    summary text;
BEGIN
    IF r.unverified + r.errors > r.warned THEN
        RAISE WARNING '% more provider keys not named above (warnings stopped after %): unverified=%, errors=% in all',
            r.unverified + r.errors - r.warned, r.warned, r.unverified, r.errors;
    END IF;
    summary := format('total=%s, %s=%s, skipped=%s, errors=%s',
        r.examined, m.done_word, r.written, r.examined - r.written - r.errors, r.errors);
    IF r.unverified > 0 THEN
        summary := summary || ', unverified=' || r.unverified;
    END IF;
    IF r.previous > 0 AND m.retire_note IS NULL THEN
        summary := summary || ', previous_key=' || r.previous;
    END IF;
    IF r.changed > 0 THEN
        summary := summary || ', changed_concurrently=' || r.changed;
    END IF;
    IF r.remaining > 0 THEN
        summary := summary || ', remaining=' || r.remaining;
    END IF;
    summary := format('Provider key %s %s: %s', m.job,
        CASE WHEN r.dry_run THEN 'dry run completed (nothing was written)'
             WHEN r.remaining > 0 THEN 'incomplete'
             ELSE 'completed' END, summary);
    IF r.verified AND r.remaining = 0 THEN
        summary := summary || format(' (verified: a scan of every row%s after the last batch found none left to %s)',
                                     CASE WHEN m.deleted_sql = 'false' THEN '' ELSE ' not soft-deleted' END, m.verb);
    END IF;
    IF r.remaining > 0 THEN
        RAISE WARNING '%', summary
            USING DETAIL = format('A scan of every row after the last batch found %s provider keys still %s: rows named above that failed, rows a trigger or rule wrote back, or rows written during the run without the guard.',
                                  r.remaining, array_to_string(m.todo, ' or ')),
                  HINT = CASE WHEN m.retire_note IS NOT NULL
                      THEN 'Keep every key configured until a run has re-encrypted them: rows written meanwhile under an older key (a gateway instance whose first secret is still the old one?) are re-encrypted by the next run.'
                      ELSE 'Fix the rows named above (if any), then run the procedure again: it skips what is done. @extschema@.provider_keys_encryption_report() counts the keys per state.' END;
    ELSIF r.errors > 0 THEN
        RAISE WARNING '%', summary
            USING HINT = 'The rows named above were left unchanged; fix them and run the procedure again (it skips what is done).';
    ELSE
        RAISE NOTICE '%', summary;
    END IF;
    IF pke_internal.keys_reload_pending() THEN
        RAISE NOTICE 'The server''s configuration was reloaded during this run: it ran to the end under the keys it started with. The keys provider_keys_encrypt.key_command prints now apply from the next statement: run it again to use them.';
    END IF;
    IF m.retire_note IS NOT NULL AND r.verified AND r.remaining = 0 THEN
        RAISE NOTICE '%', m.retire_note || CASE WHEN r.unverified > 0 THEN format(
            ' (The %s unverified provider keys open under none of the configured keys, older or not.)', r.unverified)
            ELSE '' END;
    END IF;
END
$fn$;

-- What the caller's search_path (captured where it is still the caller's: pke_internal.run and
-- the report, which carry no SET clause) holds that a call without a schema could resolve to
-- instead of this extension: a WARNING when a routine with the name of one of the
-- extension's routines, not a member of the extension, is on it (a role that can create in
-- a schema there can plant an overload that a superuser's CALL encrypt_provider_keys('t')
-- prefers: the untyped literal matches text better than regclass). Such an overload that
-- runs and then calls ours is exactly the case this names. No code of ours can stop a call
-- that never reaches it: README "What remains yours".
CREATE FUNCTION pke_internal.warn_shadowing(schemas name[])
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    found text[];
BEGIN
    WITH ours AS (
        SELECT p.oid, p.proname
          FROM pg_proc p
          JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension x ON x.oid = d.refobjid AND x.extname = 'provider_keys_encrypt'
         WHERE p.pronamespace = '@extschema@'::regnamespace)
    SELECT array_agg(format('%s (owner %s)', p.oid::regprocedure, quote_ident(r.rolname))
                     ORDER BY array_position(schemas, n.nspname), p.oid::regprocedure::text)
      INTO found
      FROM pg_proc p
      JOIN pg_namespace n ON n.oid = p.pronamespace
      JOIN pg_roles r ON r.oid = p.proowner
     WHERE n.nspname = ANY (schemas)
       AND p.proname IN (SELECT o.proname FROM ours o)
       AND p.oid NOT IN (SELECT o.oid FROM ours o);
    IF found IS NOT NULL THEN
        RAISE WARNING 'routines named like this extension''s are on your search_path: %',
            array_to_string(found[1:5], ', ')
            || CASE WHEN cardinality(found) > 5 THEN format(' and %s more', cardinality(found) - 5) ELSE '' END
            USING DETAIL = 'A call that names a routine without its schema may run one of those instead of provider_keys_encrypt''s, with your rights.',
                  HINT = 'Call the extension''s routines by their schema-qualified names (CALL @extschema@.encrypt_provider_keys(...)), and drop what you did not create (DROP ROUTINE ...).';
    END IF;
END
$fn$;

-- provider_key, as the caller's search_path (schemas, captured by the caller) finds it, for a
-- run or a report that names no table. When more than one schema on that path has one and the
-- one found first belongs to a role that cannot act as the caller, it may be a decoy that role
-- created in an earlier schema (the report and a dry run would answer for it, and the trust
-- check's "SET ROLE <owner>" would encrypt it): refused, so that the table is named. (Several
-- tables of the caller's own, picked by search_path, are a legitimate setup.)
CREATE FUNCTION pke_internal.default_table(schemas name[])
RETURNS regclass
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    found regclass[];
BEGIN
    SELECT array_agg(c.oid::regclass ORDER BY array_position(schemas, n.nspname))
      INTO found
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relname = 'provider_key' AND n.nspname = ANY (schemas);
    IF cardinality(found) > 1
       AND NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = found[1]), current_user, 'USAGE') THEN
        RAISE EXCEPTION 'more than one relation named provider_key is on your search_path: %', array_to_string(found, ', ')
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Without a table name the first one, %s, would be used: its owner %s cannot act as you, and it may not be the table you mean.',
                                  found[1], (SELECT quote_ident(r.rolname) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = found[1])),
                  HINT = format('Name the table: CALL @extschema@.encrypt_provider_keys(table_name => %L);', found[cardinality(found)]::text);
    END IF;
    RETURN found[1];
END
$fn$;

-- The run. It COMMITs after every batch when it may (CALLed outside a transaction block), so
-- it cannot carry a SET search_path clause: it contains no operator but one spelled
-- OPERATOR(pg_catalog.=) and no unqualified name,
-- and only passes the run's state between the functions above, which pin search_path.
-- (table_name NULL: provider_key, found through the caller's search_path, on purpose.)
CREATE PROCEDURE pke_internal.run(
    mode_name text, format_name text, table_name regclass, batch_size integer, dry_run boolean,
    notices boolean, encrypt_unverified boolean, guard boolean)
LANGUAGE plpgsql
AS $proc$
DECLARE
    r pke_internal.run;
BEGIN
    PERFORM pke_internal.warn_shadowing(pg_catalog.current_schemas(true));
    IF mode_name OPERATOR(pg_catalog.=) 'reencrypt' AND NOT dry_run THEN
        -- with keys from provider_keys_encrypt.key_command: no session may go on sealing under
        -- the keys from before the last reload while this run re-encrypts (and then says a
        -- previous key can be removed); waits for them before taking any lock
        PERFORM pke_internal.wait_for_older_keys();
    END IF;
    r := pke_internal.run_start(mode_name, format_name,
                                COALESCE(table_name, pke_internal.default_table(pg_catalog.current_schemas(true))),
                                batch_size, dry_run, notices, encrypt_unverified, guard,
                                pke_internal.may_commit());
    IF r.do_commit THEN
        COMMIT;  -- the guard, if run_start installed it, holds writers back no longer
    END IF;
    r := pke_internal.run_count(r);
    LOOP
        r := pke_internal.run_step(r);
        EXIT WHEN r.done;
        IF r.do_commit THEN
            COMMIT;
        END IF;
    END LOOP;
    PERFORM pke_internal.run_finish_durably(r);
    r := pke_internal.run_verify(r);
    PERFORM pke_internal.run_summary(r);
END
$proc$;
