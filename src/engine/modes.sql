-- Each mode of each token format, described once, field by field (the fields are explained in
-- types.sql, type pke_internal.mode), in three steps: what a format's three modes share, what
-- a mode is in every format, then what the mode does in that format. Nothing else in the
-- engine branches on a mode's or a format's name. An unknown mode or format is an error, never
-- a default.
--
-- The formats:
--   base64  the seed guide's: base64(nonce || tag || ciphertext) in column token, key
--           ENCRYPTION_KEY (+ ENCRYPTION_KEY_PREVIOUS). Soft-deleted rows are left
--           alone.
--   llmgw   the gateway's current: llmgw:v2:<kid>:<iv>:<ct>:<tag> in column token_ciphertext,
--           bound to the row's id and organization, with token_hash and token_masked; keyring
--           GATEWAY_API_KEY_HASH_SECRET. Every row moves, soft-deleted ones included: the
--           gateway's next migration sets the three columns NOT NULL on every row, and a row
--           left under an older secret stops opening once that secret is dropped. On the
--           gateway's final schema (no token column) only reencrypt and the report run:
--           {token} in state_sql stands for the column, or NULL when the table has none.
--           encrypt_unverified does not apply: the llmgw: prefix is unambiguous, so a value
--           that has it is never taken for a plaintext.
--
-- The guard (src/guard.rs, guard.sql): guard_args are the arguments guard => true installs
-- the trigger with. base64: none, or 'unverified=keep' when encrypt_unverified is false (the
-- run's treatment of unverified values). llmgw: 'format=llmgw'; the trigger then seals a
-- plaintext token into token_ciphertext/token_hash/token_masked with the row's id and
-- organization (crate::format::llmgw::seal_row, what set_sql writes) and sets token NULL. Its default
-- unverified=keep is the engine's treatment: an llmgw token found in column token is never
-- sealed twice (encrypt_unverified does not apply to llmgw). The columns whose UPDATE fires the
-- trigger follow from its arguments (guard_watches: token, status for base64; token for llmgw).
--
-- Every internal that reads or writes rows gets its mode from here, and here the caller's
-- right to the mode is checked: EXECUTE on its public procedure and, for a mode that writes
-- plaintext, on the format's decrypting function. So calling an internal directly never gets
-- around a REVOKE. (check_privileges => false only serves the report, which writes nothing.)

CREATE FUNCTION pke_internal.mode(mode_name text, format_name text, encrypt_unverified boolean,
                                  tbl regclass, check_privileges boolean DEFAULT true)
RETURNS pke_internal.mode
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode;
    -- the llmgw row, as its functions take it
    llmgw_row constant text := 't.id::text, t.organization_id::text';
BEGIN
    -- 1. The format: what its three modes share.
    CASE format_name
    WHEN 'base64' THEN
        m.format := 'base64';
        m.state_sql := 'pke_internal.token_state(t.token::text)';
        m.deleted_sql := 't.status IS NOT DISTINCT FROM ''deleted''';
        m.stored_sql := 'ARRAY[t.token::text]';
        m.key_id_sql := 'pke_internal.token_key_id(t.token::text)';
        m.key_sql := '@extschema@.provider_keys_encrypt_fingerprint()';
        m.key_word := 'key fingerprint';
        m.reads := '{id,token,provider,status}';
        m.optional := '{}';
        m.writes := '{token}';
        m.sets_null := '{}';
        m.table_hint := 'The table needs the provider_key columns id, token, provider and status.';
        m.found_note := '';
        -- src/guard.rs words its WARNING with the same text (pg_tests: unverified_text)
        m.unverified_text := 'looks like a token but authenticates under no configured key';
        m.guard_args := CASE WHEN encrypt_unverified THEN '{}' ELSE '{unverified=keep}' END;
    WHEN 'llmgw' THEN
        m.format := 'llmgw';
        m.state_sql := 'pke_internal.llmgw_state({token}, t.token_ciphertext::text, ' || llmgw_row || ')';
        m.deleted_sql := 'false';
        m.stored_sql := 'ARRAY[t.token_ciphertext::text, t.token_masked::text]';
        m.key_id_sql := 'pke_internal.llmgw_key_id_of(t.token_ciphertext::text, ' || llmgw_row || ')';
        m.key_sql := '@extschema@.llmgw_key_id()';
        m.key_word := 'key id';
        m.reads := '{id,provider,token,token_ciphertext,token_hash,token_masked,organization_id}';
        m.optional := '{}';
        m.sets_null := '{}';
        m.found_note := ', soft-deleted ones included';
        m.unverified_text :=
            'is unverified: its token_ciphertext opens under no secret of GATEWAY_API_KEY_HASH_SECRET for this row '
            '(llmgw_decrypt_token names the cause), or column token holds an llmgw token or a base64 token of this extension '
            '(move those with CALL @extschema@.decrypt_provider_keys(format => ''base64'') first), or the row has no token at all';
        m.guard_args := '{format=llmgw}';
    ELSE
        RAISE EXCEPTION 'unknown token format "%"', format_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The formats are ''base64'' (the seed guide''s: column token, key ENCRYPTION_KEY) and ''llmgw'' (the gateway''s current: token_ciphertext, token_hash, token_masked, keyring GATEWAY_API_KEY_HASH_SECRET).';
    END CASE;

    -- 2. The mode: what it is in every format.
    CASE mode_name
    WHEN 'encrypt' THEN
        m.name := 'encrypt';
        m.entry_point := 'encrypt_provider_keys(regclass,integer,boolean,boolean,boolean,text,boolean)';
        m.job := 'encryption migration';
        m.done_word := 'encrypted';
        m.past := 'Encrypted';
        m.verb := 'encrypt';
        m.todo := CASE WHEN encrypt_unverified THEN '{plaintext,unverified}' ELSE '{plaintext}' END;
        m.target := '{current_key}';
    WHEN 'decrypt' THEN
        m.name := 'decrypt';
        m.entry_point := 'decrypt_provider_keys(regclass,integer,boolean,boolean,text)';
        m.job := 'decryption';
        m.done_word := 'decrypted';
        m.past := 'Decrypted';
        m.verb := 'decrypt';
        m.todo := '{current_key,previous_key}';
        m.target := '{plaintext,unverified}';
    WHEN 'reencrypt' THEN
        m.name := 'reencrypt';
        m.entry_point := 'reencrypt_provider_keys(regclass,integer,boolean,boolean,text)';
        m.job := 're-encryption';
        m.done_word := 'reencrypted';
        m.past := 'Re-encrypted';
        m.verb := 're-encrypt';
        m.todo := '{previous_key}';
        m.target := '{current_key}';
    ELSE
        RAISE EXCEPTION 'unknown mode "%"', mode_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The modes are encrypt, decrypt and reencrypt.';
    END CASE;

    -- 3. The mode in this format: the SET list that moves a row, and what differs from the above.
    CASE m.format || ' ' || m.name
    WHEN 'base64 encrypt' THEN
        m.set_sql := 'token = @extschema@.encrypt_token(t.token::text)';
    WHEN 'base64 decrypt' THEN
        m.set_sql := 'token = @extschema@.decrypt_token(t.token::text)';
        m.reveals := 'decrypt_token(text)';
        m.plain_sql := '@extschema@.decrypt_token(t.token::text)';
    WHEN 'base64 reencrypt' THEN
        m.set_sql := 'token = pke_internal.reencrypt(t.token::text)';
        m.retire_note := 'No provider key needs a previous key any more: ENCRYPTION_KEY_PREVIOUS can be removed from the server''s environment (it is read at server start: the change takes effect at the next restart), or from what provider_keys_encrypt.key_command prints (the change takes effect at the next SELECT pg_reload_conf()); SHOW provider_keys_encrypt.previous_keys shows what is configured now.';
    WHEN 'llmgw encrypt' THEN
        m.job := 'backfill (llmgw)';
        -- the unambiguous llmgw: prefix: a value that has it is never taken for a plaintext
        m.todo := '{plaintext}';
        m.set_sql := 'token = NULL, '
                     'token_ciphertext = @extschema@.llmgw_encrypt_token(t.token::text, ' || llmgw_row || '), '
                     'token_hash = @extschema@.llmgw_token_hash(t.token::text), '
                     'token_masked = @extschema@.llmgw_mask_token(t.token::text)';
        m.stored_sql := 'ARRAY[t.token::text, @extschema@.llmgw_mask_token(t.token::text)]';
        m.writes := '{token,token_ciphertext,token_hash,token_masked}';
        m.sets_null := '{token}';
        m.table_hint := 'The llmgw format moves keys from token to token_ciphertext, token_hash and token_masked (with id, provider '
                        'and organization_id): the gateway''s rollout schema. Without column token the gateway''s final migration has '
                        'run and nothing is left to encrypt; rotate with CALL @extschema@.reencrypt_provider_keys(format => ''llmgw'').';
        m.found_note := ', soft-deleted ones included: the gateway''s next migration sets token_ciphertext, token_hash and token_masked NOT NULL on every row';
        m.notice_sql := 'pke_internal.base64_check_notice()';
    WHEN 'llmgw decrypt' THEN
        m.job := 'decryption (llmgw)';
        m.set_sql := 'token = @extschema@.llmgw_decrypt_token(t.token_ciphertext::text, ' || llmgw_row || '), '
                     'token_ciphertext = NULL';
        m.reveals := 'llmgw_decrypt_token(text, text, text)';
        m.plain_sql := '@extschema@.llmgw_decrypt_token(t.token_ciphertext::text, ' || llmgw_row || ')';
        m.writes := '{token,token_ciphertext}';
        m.sets_null := '{token_ciphertext}';
        m.table_hint := 'Rolling back to plaintext needs column token: after the gateway''s final migration, add it back first '
                        '(ALTER TABLE provider_key ADD COLUMN token text, ALTER COLUMN token_ciphertext DROP NOT NULL).';
    WHEN 'llmgw reencrypt' THEN
        m.job := 're-encryption (llmgw)';
        m.set_sql := '(token_ciphertext, token_hash) = (SELECT r.token_ciphertext, r.token_hash '
                     'FROM pke_internal.llmgw_reencrypt(t.token_ciphertext::text, ' || llmgw_row || ') r)';
        -- the gateway's final schema has no column token: rotation still runs there
        m.reads := '{id,provider,token_ciphertext,token_hash,organization_id}';
        m.optional := '{token}';
        m.writes := '{token_ciphertext,token_hash}';
        m.table_hint := 'Rotation needs id, provider, token_ciphertext, token_hash and organization_id (the gateway''s rollout or final schema).';
        m.found_note := ', soft-deleted ones included: a row left under an older secret stops opening once that secret is dropped';
        m.retire_note := 'No provider key needs an older secret any more: GATEWAY_API_KEY_HASH_SECRET can be cut down to its first '
                         '(current) secret, on the gateway and on this server.';
    END CASE;

    -- {token}: the column when the table has it (the gateway's rollout), else NULL (its final
    -- schema, where every key is in token_ciphertext)
    m.state_sql := replace(m.state_sql, '{token}',
        CASE WHEN tbl IS NULL OR EXISTS (SELECT 1 FROM pg_attribute a
                                          WHERE a.attrelid = tbl AND a.attname = 'token' AND a.attnum > 0
                                            AND NOT a.attisdropped)
             THEN 't.token::text' ELSE 'NULL::text' END);
    IF check_privileges THEN
        -- the exact procedure (an overload someone else created has another signature)
        IF NOT has_function_privilege(format('@extschema@.%s', m.entry_point), 'EXECUTE') THEN
            RAISE EXCEPTION 'permission denied for procedure %', split_part(m.entry_point, '(', 1)
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF m.reveals IS NOT NULL AND NOT has_function_privilege(format('@extschema@.%s', m.reveals), 'EXECUTE') THEN
            RAISE EXCEPTION 'permission denied for function %', split_part(m.reveals, '(', 1)
                USING ERRCODE = 'insufficient_privilege',
                      HINT = format('%s writes plaintext: it needs EXECUTE on %s too.', split_part(m.entry_point, '(', 1), m.reveals);
        END IF;
    END IF;
    RETURN m;
END
$fn$;
