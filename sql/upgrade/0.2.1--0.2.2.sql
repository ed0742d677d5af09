-- provider_keys_encrypt 0.2.1 -> 0.2.2: the hand-written part of the upgrade, what CREATE OR
-- REPLACE cannot do. scripts/upgrade-script appends the engine functions that changed.
--
-- 0.2.2's library reads key variables from files too (ENCRYPTION_KEY_FILE,
-- ENCRYPTION_KEY_PREVIOUS_FILE, GATEWAY_API_KEY_HASH_SECRET_FILE) at server start, or from a
-- command (provider_keys_encrypt.key_command) at start and after each reload; its
-- reencrypt_provider_keys first waits for sessions still on keys from before a reload. Its engine
-- does what 0.2.1's did, written more plainly: pke_internal.mode describes each mode field by
-- field, batch_messages takes the unverified WARNING's words from the mode, and the batch
-- internals take the run's record. Install the new package and restart the server before
-- ALTER EXTENSION provider_keys_encrypt UPDATE, so that every backend runs the new library.

-- The batch internals take the run's record (its mode, format, table, position and options)
-- instead of up to twelve loose arguments: new signatures.
DROP FUNCTION pke_internal.batch(text, text, boolean, regclass, text, integer, boolean, boolean, boolean, bigint);
DROP FUNCTION pke_internal.batch_isolate(text, text, boolean, regclass, text, text[], integer, boolean);
DROP FUNCTION pke_internal.batch_apply(text, text, boolean, regclass, text, text[], integer, boolean, boolean, boolean, boolean, boolean);

-- A run's summary says when a configuration reload arrived during it (the key command's new
-- keys apply from the next statement): a new function of the library.
CREATE FUNCTION pke_internal.keys_reload_pending() RETURNS boolean
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pke_keys_reload_pending_wrapper';

-- reencrypt_provider_keys first waits for sessions whose transaction or CALL still uses keys
-- from before the last reload (with a key command): a new function of the library, which
-- pke_internal.run calls.
CREATE FUNCTION pke_internal.wait_for_older_keys() RETURNS integer
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pke_wait_for_older_keys_wrapper';
