-- provider_keys_encrypt 0.2.0 -> 0.2.1: the hand-written part of the upgrade, what CREATE OR
-- REPLACE cannot do. scripts/upgrade-script appends every engine function and the privileges.

-- A run's state carries the final verification (run_verify), a batch's result every row it
-- wrote on a table whose triggers could rewrite it (batch_recheck). New attributes go last, as
-- in a fresh install's types.sql.
ALTER TYPE pke_internal.run ADD ATTRIBUTE verified boolean, ADD ATTRIBUTE remaining bigint;
ALTER TYPE pke_internal.batch_rows ADD ATTRIBUTE landed_ids text[];

-- batch_isolate returns the failing rows for batch() to report (or to stop on, when every row
-- of a batch fails the same way) instead of printing them: new OUT parameters.
DROP FUNCTION pke_internal.batch_isolate(text, text, boolean, regclass, text, text[], integer, boolean);

-- The report's internal takes the caller's search_path (the default table, the shadowing
-- warning): a new signature.
DROP FUNCTION pke_internal.report(regclass, boolean, text);

-- A guard with wrong arguments is refused when it is created (guard.sql): the event trigger,
-- on a stub of its function that the generated part below replaces with the real one.
CREATE FUNCTION pke_internal.guard_ddl_check() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE EVENT TRIGGER provider_keys_encrypt_guard_check ON ddl_command_end
    WHEN TAG IN ('CREATE TRIGGER')
    EXECUTE FUNCTION pke_internal.guard_ddl_check();
COMMENT ON EVENT TRIGGER provider_keys_encrypt_guard_check IS
'provider_keys_encrypt: refuses a guard trigger whose arguments are wrong or that is not BEFORE ... FOR EACH ROW, when it is created.';
