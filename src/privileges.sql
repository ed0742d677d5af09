-- Privileges. PostgreSQL grants EXECUTE on new functions and procedures to PUBLIC; this file
-- takes back what must not be public, and says why for what stays. Runs last.

-- decrypt_token returns plaintext API keys: only roles an administrator names may call it
-- (GRANT EXECUTE ON FUNCTION decrypt_token(text) TO <gateway role>).
REVOKE ALL ON FUNCTION @extschema@.decrypt_token(text) FROM PUBLIC;

-- llmgw_decrypt_token returns plaintext API keys too (the gateway's llmgw format): the same
-- rule (GRANT EXECUTE ON FUNCTION llmgw_decrypt_token(text, text, text) TO <role>).
REVOKE ALL ON FUNCTION @extschema@.llmgw_decrypt_token(text, text, text) FROM PUBLIC;

-- decrypt_provider_keys writes plaintext back into the table: an administrator's rollback,
-- never a public one. It also needs EXECUTE on the format's decrypting function (decrypt_token,
-- llmgw_decrypt_token) and UPDATE on the table.
REVOKE ALL ON PROCEDURE @extschema@.decrypt_provider_keys(regclass, integer, boolean, boolean, text) FROM PUBLIC;

-- encrypt_token, is_encrypted_token, provider_keys_encrypt_fingerprint and
-- provider_keys_encrypt_keys stay PUBLIC: encrypting reveals nothing, the verify check only
-- says whether a value authenticates, and fingerprints are designed to be shown.

-- llmgw_encrypt_token, llmgw_token_hash, llmgw_mask_token and llmgw_key_id stay PUBLIC, for
-- the same reasons: sealing reveals nothing; the HMAC reveals nothing about the secret and, like
-- a sealed token, is only worth something written into a row, which takes UPDATE on the table
-- (the encrypt procedure computes it for any caller anyway); a mask is the gateway's
-- shown-to-users form; key ids are one-way and stored in every token.

-- encrypt_provider_keys, reencrypt_provider_keys and provider_keys_encryption_report stay
-- PUBLIC: they run with the caller's rights (SELECT/UPDATE on the table) and never return a
-- plaintext.

-- provider_keys_encrypt_guard stays PUBLIC: putting it on a table needs the TRIGGER privilege
-- on that table anyway, and it only encrypts (or refuses) what is being written.

-- provider_keys_guard_status stays PUBLIC: it shows what pg_trigger shows everyone.

-- The internals' schema: USAGE for everyone, because the public procedures run with the
-- caller's rights and call into it; CREATE for nobody but its owner (the superuser who created
-- the extension), so no role can plant a function, an operator or a type where the engine
-- looks.
REVOKE ALL ON SCHEMA pke_internal FROM PUBLIC;
GRANT USAGE ON SCHEMA pke_internal TO PUBLIC;

-- Functions in pke_internal stay executable by PUBLIC, and none reveals more than the public
-- surface: token_state, llmgw_state, token_key_id and llmgw_key_id_of say no more than
-- is_encrypted_token and the key ids; reencrypt and llmgw_reencrypt return a new token (as
-- encrypt_token would) and, for llmgw, the token_hash of its plaintext (what the row's
-- token_hash column holds: good for confirming a guess, never for reading a key), never the
-- plaintext; guard_settings and guard_watches only parse trigger arguments; guards and
-- guard_check read catalogs everyone can read, and so does schema_writers; base64_check_notice
-- says whether ENCRYPTION_KEY is set (as provider_keys_encrypt_fingerprint does); guard_install
-- creates a trigger only with the caller's own TRIGGER privilege; pending_checks_pass runs the
-- caller's own deferred checks in a savepoint it rolls back and names a constraint, never a value; scrub only replaces text; every internal that reads or writes rows takes a mode
-- by name from pke_internal.mode, which refuses an unknown mode and a caller without EXECUTE
-- on that mode's public procedure (and on the format's decrypting function when the mode
-- writes plaintext). All of them run with the caller's rights.

-- pke_internal.guard_ddl_check, the event trigger's function, stays executable by PUBLIC: an
-- event trigger function cannot be called directly (it only runs as an event trigger), and it
-- only reads catalogs and refuses a broken guard trigger.

-- The internals 0.2.1 adds stay executable by PUBLIC too, for the same reasons: state_counts
-- and todo_count count a table's rows per state with the caller's own SELECT (what the report
-- shows); batch_recheck classifies rows the caller can read; warn_shadowing, default_table,
-- guard_gap and deferrable_constraints read catalogs everyone can read; pending_checks_pass
-- runs the caller's own pending deferred checks in a savepoint it rolls back. A mode record
-- built by hand and passed to one of them runs only what its caller could run directly.

-- The internals 0.2.2 adds stay executable by PUBLIC too: keys_reload_pending only says
-- whether a configuration reload arrived during the caller's own statement while a key command
-- gives the keys (nothing about the keys); wait_for_older_keys only waits (as a lock wait the
-- caller's own lock_timeout and cancel bound) for other sessions' transactions still on older
-- keys, and names their pids, which pg_stat_activity shows to every role. The batch internals that take a run's record
-- (batch, batch_apply, batch_isolate) take their mode by name from pke_internal.mode, as before.
