-- The guard (src/guard.rs): a trigger that encrypts, or refuses, a plaintext token written
-- while a run goes on or after it. Here: which guards a table has, the checks before a run
-- installs one, the install itself, and the status users read.

-- Every guard trigger on tbl and its partitions (tbl NULL: on every table), with its settings
-- as the trigger itself reads them (pke_internal.guard_settings: the same parser), whether it
-- fires (enabled: in ordinary sessions) and whether it sees every write that can bring a
-- plaintext back (covers_writes: BEFORE, FOR EACH ROW, INSERT and UPDATE of the columns its
-- format watches, no WHEN clause: id, token and status for base64, id and token for llmgw; the list comes
-- from the trigger's own parser).
CREATE FUNCTION pke_internal.guards(tbl regclass)
RETURNS TABLE (relation regclass, trigger_name text, enabled boolean, covers_writes boolean,
               mode text, format text, unverified text, problem text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT tg.tgrelid::regclass, tg.tgname::text, tg.tgenabled IN ('O', 'A'),
           (tg.tgtype & 1) <> 0          -- FOR EACH ROW
           AND (tg.tgtype & 2) <> 0      -- BEFORE
           AND (tg.tgtype & 4) <> 0      -- INSERT
           AND (tg.tgtype & 16) <> 0     -- UPDATE
           AND tg.tgqual IS NULL
           AND coalesce(cardinality(tg.tgattr::int2[]) = 0
                        OR (SELECT count(*) FROM pg_attribute a
                             WHERE a.attrelid = tg.tgrelid AND a.attname::text = ANY (s.watches)
                               AND a.attnum = ANY (tg.tgattr::int2[])) = cardinality(s.watches),
                        false),  -- arguments it cannot read: it watches nothing for sure
           s.mode, s.format, s.unverified, s.problem
      FROM pg_trigger tg
     CROSS JOIN LATERAL pke_internal.guard_settings(tg.tgnargs, tg.tgargs) s
     WHERE tg.tgfoid = '@extschema@.provider_keys_encrypt_guard()'::regprocedure
       AND (tbl IS NULL OR tg.tgrelid = tbl OR tg.tgrelid IN (SELECT p.relid FROM pg_partition_tree(tbl) p))
     ORDER BY tg.tgrelid::regclass::text, tg.tgname
$fn$;

-- The columns whose UPDATE a guard with these arguments must fire on, from the trigger's own
-- parser (pke_internal.guard_settings reads them as pg_trigger.tgargs: each followed by a NUL).
CREATE FUNCTION pke_internal.guard_watches(args text[])
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT s.watches
      FROM pke_internal.guard_settings(
               cardinality(args)::smallint,
               coalesce((SELECT string_agg(convert_to(a.arg, 'UTF8') || '\x00'::bytea, ''::bytea ORDER BY a.n)
                           FROM unnest(args) WITH ORDINALITY a(arg, n)), ''::bytea)) s
$fn$;

-- The first relation of tbl's tree (tbl and every partition, at every level) that has no
-- enabled guard of this format covering every write, and why; no row when each has one.
-- PostgreSQL clones a row trigger of a partitioned table to every partition, attached now or
-- later (an ATTACH of a table that already has a trigger of that name fails), and each clone
-- can be disabled on its own (ALTER TABLE partition DISABLE TRIGGER …): a guard on the parent
-- protects only the partitions whose clone fires.
CREATE FUNCTION pke_internal.guard_gap(tbl regclass, format_name text)
RETURNS TABLE (relation regclass, trigger_name text, why text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT t.relid, g.trigger_name,
           CASE WHEN g.trigger_name IS NULL THEN 'it has no guard'
                WHEN g.problem IS NOT NULL THEN g.problem
                WHEN NOT g.enabled THEN 'its guard is disabled'
                WHEN NOT g.covers_writes THEN 'its guard does not fire before every write'
                ELSE format('its guard is for format %s', g.format) END
      FROM (SELECT tbl AS relid UNION SELECT p.relid FROM pg_partition_tree(tbl) p) t
      LEFT JOIN LATERAL (
          SELECT x.* FROM pke_internal.guards(t.relid) x
           WHERE x.relation = t.relid
           ORDER BY (x.enabled AND x.covers_writes AND x.problem IS NULL AND x.format = format_name) DESC,
                    x.trigger_name
           LIMIT 1) g ON true
     WHERE g.trigger_name IS NULL
        OR NOT (g.enabled AND g.covers_writes AND g.problem IS NULL AND g.format = format_name)
     ORDER BY t.relid::text
     LIMIT 1
$fn$;

-- Before a run that installs the guard touches anything: the caller may create the trigger
-- (the TRIGGER privilege on the table, which its owner has, and EXECUTE on the guard), and
-- no half-working guard, guard for the other format or foreign trigger of the same name is in
-- the way. m: the run's mode (its format, guard_args). (The columns the guard watches exist:
-- check_table has checked the mode's reads, which include them.)
CREATE FUNCTION pke_internal.guard_check(tbl regclass, m pke_internal.mode)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    g record;
    gap record;
BEGIN
    IF NOT has_table_privilege(tbl, 'TRIGGER') THEN
        RAISE EXCEPTION 'permission denied to install the guard on table %', tbl
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Installing the guard creates a trigger, which needs the TRIGGER privilege on the table (its owner has it).',
                  HINT = format('Run it as the table''s owner (SET ROLE %s), or without guard => true.',
                                (SELECT c.relowner::regrole FROM pg_class c WHERE c.oid = tbl));
    END IF;
    IF NOT has_function_privilege('@extschema@.provider_keys_encrypt_guard()', 'EXECUTE') THEN
        RAISE EXCEPTION 'permission denied for function provider_keys_encrypt_guard'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT * INTO g FROM pke_internal.guards(tbl) x
     WHERE x.relation = tbl AND x.enabled AND x.covers_writes AND x.problem IS NULL
     ORDER BY x.format = m.format DESC, x.trigger_name LIMIT 1;
    IF FOUND AND g.format = m.format THEN
        -- installed and working on the table: on every partition too?
        SELECT * INTO gap FROM pke_internal.guard_gap(tbl, m.format);
        IF FOUND THEN
            RAISE EXCEPTION 'the guard on % does not protect its partition %: %', tbl, gap.relation, gap.why
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'A plaintext key written to that partition would be stored as written.',
                      HINT = CASE WHEN gap.why = 'its guard is disabled'
                          THEN format('Enable it: ALTER TABLE %s ENABLE TRIGGER %I;', gap.relation, gap.trigger_name)
                          ELSE format('Drop the guard (DROP TRIGGER %I ON %s) and run again: the run installs it on the table, and PostgreSQL on every partition.',
                                      g.trigger_name, tbl) END;
        END IF;
        RETURN;  -- installed and working: the run says so and goes on
    ELSIF FOUND THEN
        RAISE EXCEPTION 'table % has a guard for format %, not %: trigger %', tbl, g.format, m.format, quote_ident(g.trigger_name)
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A guard seals a plaintext token in its own format only; the run''s format is the one the gateway reads.',
                  HINT = format('Check the format => argument. To change the guard''s format, drop it (DROP TRIGGER %I ON %s) and run again: the run installs one for format %s.',
                                g.trigger_name, tbl, m.format);
    END IF;
    SELECT * INTO g FROM pke_internal.guards(tbl) x WHERE x.relation = tbl LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'table % has a guard that does not protect it: trigger %', tbl, quote_ident(g.trigger_name)
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = CASE WHEN g.problem IS NOT NULL THEN g.problem
                                WHEN NOT g.enabled THEN 'The trigger is disabled.'
                                ELSE format('It does not fire BEFORE INSERT OR UPDATE OF %s FOR EACH ROW on every row.',
                                            array_to_string(pke_internal.guard_watches(m.guard_args), ', ')) END,
                  HINT = format('Drop it (DROP TRIGGER %I ON %s) and run again: the run installs a working one.', g.trigger_name, tbl);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = tbl AND tg.tgname = 'provider_keys_encrypt_guard') THEN
        RAISE EXCEPTION 'table % already has a trigger named provider_keys_encrypt_guard that is not the guard', tbl
            USING ERRCODE = 'duplicate_object';
    END IF;
END
$fn$;

-- Install the guard on tbl, once (after guard_check, and after every other check of the run),
-- with the mode's guard_args (modes.sql): the format, and for base64 the run's treatment of
-- unverified values (encrypt_unverified => false: 'unverified=keep'). It fires on INSERT and
-- on an UPDATE of the columns those arguments watch (base64: id, token, status; llmgw: id, token).
-- The caller commits right after, so that writers wait for the trigger's lock as briefly as
-- possible.
CREATE FUNCTION pke_internal.guard_install(tbl regclass, m pke_internal.mode, dry_run boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    g record;
BEGIN
    SELECT * INTO g FROM pke_internal.guards(tbl) x
     WHERE x.relation = tbl AND x.enabled AND x.covers_writes AND x.problem IS NULL
     ORDER BY x.trigger_name LIMIT 1;
    IF FOUND THEN
        RAISE NOTICE '%', format('The guard is already installed on %s: trigger %s (mode=%s, unverified=%s)',
                                 tbl, quote_ident(g.trigger_name), g.mode, g.unverified);
        RETURN;
    END IF;
    IF dry_run THEN
        RAISE NOTICE '%', format('Would install the guard on %s (dry run: not installed)', tbl);
        RETURN;
    END IF;
    EXECUTE format('CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF %s ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION @extschema@.provider_keys_encrypt_guard(%s)',
                   (SELECT string_agg(quote_ident(c.col), ', ' ORDER BY c.n)
                      FROM unnest(pke_internal.guard_watches(m.guard_args)) WITH ORDINALITY c(col, n)),
                   tbl,
                   coalesce((SELECT string_agg(quote_literal(a.arg), ', ' ORDER BY a.n)
                               FROM unnest(m.guard_args) WITH ORDINALITY a(arg, n)), ''));
    RAISE NOTICE '%', format('Installed the guard on %s: a plaintext token written to it from now on is encrypted on write (remove it with: DROP TRIGGER provider_keys_encrypt_guard ON %s)',
                             tbl, tbl);
END
$fn$;

-- A mode that writes plaintext (decrypt) refuses to run while an enabled guard is on the
-- table: the guard would encrypt again (or refuse) every row it writes.
CREATE FUNCTION pke_internal.guard_absent(tbl regclass)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    g record;
BEGIN
    SELECT * INTO g FROM pke_internal.guards(tbl) x WHERE x.enabled LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'table % has the guard installed (trigger % on %): it would encrypt again every key written back in plaintext',
                tbl, quote_ident(g.trigger_name), g.relation
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Remove the guard first, then run again: DROP TRIGGER %I ON %s;', g.trigger_name, g.relation);
    END IF;
END
$fn$;

-- What users call.
CREATE FUNCTION @extschema@.provider_keys_guard_status(table_name regclass DEFAULT NULL)
RETURNS TABLE (relation regclass, trigger_name text, enabled boolean, covers_writes boolean,
               mode text, format text, unverified text, problem text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT * FROM pke_internal.guards(table_name)
$fn$;

COMMENT ON FUNCTION @extschema@.provider_keys_guard_status(regclass) IS
'The guard triggers on a table and its partitions (NULL: on every table): enabled, covering every write, mode, format, unverified treatment, and what is wrong with their arguments.';

-- A guard with arguments it cannot read, or fired otherwise than BEFORE INSERT OR UPDATE … FOR
-- EACH ROW (AFTER, INSTEAD OF, FOR EACH STATEMENT, or on DELETE or TRUNCATE too), would
-- refuse every write of the application once it is in place (the trigger raises on every row):
-- refused when the trigger is created instead, by this event trigger of the extension. It
-- runs as the role creating the trigger, reads only catalogs, and lets every other CREATE
-- TRIGGER through after one catalog look-up. (Guards created while it was disabled still
-- show their problem in provider_keys_guard_status().)
CREATE FUNCTION pke_internal.guard_ddl_check()
RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT tg.tgrelid::regclass AS relation, tg.tgname::text AS trigger_name, tg.tgtype, s.problem
          FROM pg_event_trigger_ddl_commands() c
          JOIN pg_trigger tg ON tg.oid = c.objid
         CROSS JOIN LATERAL pke_internal.guard_settings(tg.tgnargs, tg.tgargs) s
         WHERE c.classid = 'pg_trigger'::regclass
           AND tg.tgfoid = '@extschema@.provider_keys_encrypt_guard()'::regprocedure
    LOOP
        IF g.problem IS NOT NULL THEN
            RAISE EXCEPTION 'trigger % on %: %', quote_ident(g.trigger_name), g.relation, g.problem
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'The guard would refuse every write to the table with this error.',
                      HINT = 'The guard''s arguments are mode=encrypt|reject, unverified=plaintext|keep and format=base64|llmgw, each at most once; none gives the defaults (mode=encrypt, format=base64, unverified=plaintext; for format=llmgw unverified=keep).';
        END IF;
        -- tgtype: 1 FOR EACH ROW, 2 BEFORE, 4 INSERT, 8 DELETE, 16 UPDATE, 32 TRUNCATE, 64 INSTEAD OF
        IF (g.tgtype & 1) = 0 OR (g.tgtype & 2) = 0 OR (g.tgtype & (8 | 32 | 64)) <> 0 OR (g.tgtype & (4 | 16)) = 0 THEN
            RAISE EXCEPTION 'trigger % on %: provider_keys_encrypt_guard() must be fired BEFORE INSERT OR UPDATE, FOR EACH ROW', quote_ident(g.trigger_name), g.relation
                USING ERRCODE = 'trigger_protocol_violated',
                      DETAIL = 'The guard would refuse every write to the table with this error.',
                      HINT = 'CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON <table> FOR EACH ROW EXECUTE FUNCTION @extschema@.provider_keys_encrypt_guard(); for the llmgw layout: BEFORE INSERT OR UPDATE OF id, token ... @extschema@.provider_keys_encrypt_guard(''format=llmgw'').';
        END IF;
    END LOOP;
END
$fn$;

CREATE EVENT TRIGGER provider_keys_encrypt_guard_check ON ddl_command_end
    WHEN TAG IN ('CREATE TRIGGER')
    EXECUTE FUNCTION pke_internal.guard_ddl_check();
COMMENT ON EVENT TRIGGER provider_keys_encrypt_guard_check IS
'provider_keys_encrypt: refuses a guard trigger whose arguments are wrong or that is not BEFORE ... FOR EACH ROW, when it is created.';
