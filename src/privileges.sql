-- Privileges. PostgreSQL grants EXECUTE on new functions and procedures to PUBLIC; this file
-- takes back what must not be public. Each line says why.

-- decrypt_token returns plaintext API keys: only roles an administrator names may call it
-- (GRANT EXECUTE ON FUNCTION decrypt_token(text) TO <gateway role>).
REVOKE ALL ON FUNCTION @extschema@.decrypt_token(text) FROM PUBLIC;

-- decrypt_provider_keys writes plaintext back into the table: an administrator's rollback,
-- never a public one. (It also needs EXECUTE on decrypt_token and UPDATE on the table.)
REVOKE ALL ON PROCEDURE @extschema@.decrypt_provider_keys(regclass, integer, boolean, boolean) FROM PUBLIC;

-- encrypt_token, is_encrypted_token, provider_keys_encrypt_fingerprint and
-- provider_keys_encrypt_keys stay PUBLIC: encrypting reveals nothing, the verify check only
-- says whether a value authenticates, and fingerprints are designed to be shown.

-- encrypt_provider_keys, reencrypt_provider_keys and provider_keys_encryption_report stay
-- PUBLIC: they run with the caller's rights, so they need SELECT/UPDATE on the table, and
-- they never return a plaintext.

-- Engine internals. The helpers below reveal nothing a PUBLIC function doesn't (a token's
-- state, a re-sealed token, a message with secrets removed) and must stay callable by
-- whoever runs the public procedures, which execute with the caller's rights.
--   _pke_token_state, _pke_reencrypt, _pke_scrub, _pke_may_commit, _pke_subxact_status,
--   _pke_check_table, _pke_batch, _pke_run: PUBLIC.
-- But _pke_batch/_pke_run in 'decrypt' mode call decrypt_token with the caller's rights, so
-- a caller without EXECUTE on decrypt_token cannot use them to decrypt.
