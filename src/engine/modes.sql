-- Each mode of each token format, described once. Everything that differs between encrypting,
-- decrypting and re-encrypting, and between the formats, is a column of this one VALUES list
-- (the columns are explained in types.sql, type pke_internal.mode); nothing else in the engine
-- branches on a mode's or a format's name. An unknown mode or format is an error, never a
-- default.
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
-- organization (crate::llmgw::seal_row, what set_sql writes) and sets token NULL. Its default
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
    found_format boolean := false;
    -- the three llmgw modes' unverified_text
    llmgw_unverified constant text :=
        'is unverified: its token_ciphertext opens under no secret of GATEWAY_API_KEY_HASH_SECRET for this row '
        '(llmgw_decrypt_token names the cause), or column token holds an llmgw token or a base64 token of this extension '
        '(move those with CALL @extschema@.decrypt_provider_keys(format => ''base64'') first), or the row has no token at all';
BEGIN
    FOR m IN
      SELECT v.*
      FROM (VALUES
        -- base64 ---------------------------------------------------------------------------
        ('encrypt', 'base64', 'encrypt_provider_keys(regclass,integer,boolean,boolean,boolean,text,boolean)', 'encryption migration', 'encrypted', 'Encrypted', 'encrypt',
         CASE WHEN encrypt_unverified THEN '{plaintext,unverified}' ELSE '{plaintext}' END::pke_internal.token_state[],
         '{current_key}'::pke_internal.token_state[],
         'pke_internal.token_state(t.token::text)',
         'token = @extschema@.encrypt_token(t.token::text)',
         't.status IS NOT DISTINCT FROM ''deleted''',
         NULL, NULL, 'ARRAY[t.token::text]',
         'pke_internal.token_key_id(t.token::text)', '@extschema@.provider_keys_encrypt_fingerprint()', 'key fingerprint',
         '{id,token,provider,status}'::text[], '{}'::text[], '{token}'::text[], '{}'::text[],
         'The table needs the provider_key columns id, token, provider and status.',
         '',
         'looks like a token but authenticates under no configured key',
         NULL,
         CASE WHEN encrypt_unverified THEN '{}' ELSE '{unverified=keep}' END::text[],
         NULL),
        ('decrypt', 'base64', 'decrypt_provider_keys(regclass,integer,boolean,boolean,text)', 'decryption', 'decrypted', 'Decrypted', 'decrypt',
         '{current_key,previous_key}'::pke_internal.token_state[],
         '{plaintext,unverified}'::pke_internal.token_state[],
         'pke_internal.token_state(t.token::text)',
         'token = @extschema@.decrypt_token(t.token::text)',
         't.status IS NOT DISTINCT FROM ''deleted''',
         'decrypt_token(text)', '@extschema@.decrypt_token(t.token::text)', 'ARRAY[t.token::text]',
         'pke_internal.token_key_id(t.token::text)', '@extschema@.provider_keys_encrypt_fingerprint()', 'key fingerprint',
         '{id,token,provider,status}'::text[], '{}'::text[], '{token}'::text[], '{}'::text[],
         'The table needs the provider_key columns id, token, provider and status.',
         '',
         'looks like a token but authenticates under no configured key',
         NULL,
         CASE WHEN encrypt_unverified THEN '{}' ELSE '{unverified=keep}' END::text[],
         NULL),
        ('reencrypt', 'base64', 'reencrypt_provider_keys(regclass,integer,boolean,boolean,text)', 're-encryption', 'reencrypted', 'Re-encrypted', 're-encrypt',
         '{previous_key}'::pke_internal.token_state[],
         '{current_key}'::pke_internal.token_state[],
         'pke_internal.token_state(t.token::text)',
         'token = pke_internal.reencrypt(t.token::text)',
         't.status IS NOT DISTINCT FROM ''deleted''',
         NULL, NULL, 'ARRAY[t.token::text]',
         'pke_internal.token_key_id(t.token::text)', '@extschema@.provider_keys_encrypt_fingerprint()', 'key fingerprint',
         '{id,token,provider,status}'::text[], '{}'::text[], '{token}'::text[], '{}'::text[],
         'The table needs the provider_key columns id, token, provider and status.',
         '',
         'looks like a token but authenticates under no configured key',
         'No provider key needs a previous key any more: ENCRYPTION_KEY_PREVIOUS can be removed from the server''s environment (it is read at server start: the change takes effect at the next restart; SHOW provider_keys_encrypt.previous_keys shows what is configured now).',
         CASE WHEN encrypt_unverified THEN '{}' ELSE '{unverified=keep}' END::text[],
         NULL),
        -- llmgw ----------------------------------------------------------------------------
        ('encrypt', 'llmgw', 'encrypt_provider_keys(regclass,integer,boolean,boolean,boolean,text,boolean)', 'backfill (llmgw)', 'encrypted', 'Encrypted', 'encrypt',
         '{plaintext}'::pke_internal.token_state[],
         '{current_key}'::pke_internal.token_state[],
         'pke_internal.llmgw_state({token}, t.token_ciphertext::text, t.id::text, t.organization_id::text)',
         'token = NULL, '
         'token_ciphertext = @extschema@.llmgw_encrypt_token(t.token::text, t.id::text, t.organization_id::text), '
         'token_hash = @extschema@.llmgw_token_hash(t.token::text), '
         'token_masked = @extschema@.llmgw_mask_token(t.token::text)',
         'false',
         NULL, NULL, 'ARRAY[t.token::text, @extschema@.llmgw_mask_token(t.token::text)]',
         'pke_internal.llmgw_key_id_of(t.token_ciphertext::text, t.id::text, t.organization_id::text)',
         '@extschema@.llmgw_key_id()', 'key id',
         '{id,provider,token,token_ciphertext,token_hash,token_masked,organization_id}'::text[], '{}'::text[],
         '{token,token_ciphertext,token_hash,token_masked}'::text[], '{token}'::text[],
         'The llmgw format moves keys from token to token_ciphertext, token_hash and token_masked (with id, provider '
         'and organization_id): the gateway''s rollout schema. Without column token the gateway''s final migration has '
         'run and nothing is left to encrypt; rotate with CALL @extschema@.reencrypt_provider_keys(format => ''llmgw'').',
         ', soft-deleted ones included: the gateway''s next migration sets token_ciphertext, token_hash and token_masked NOT NULL on every row',
         llmgw_unverified,
         NULL,
         '{format=llmgw}'::text[],
         'pke_internal.base64_check_notice()'),
        ('decrypt', 'llmgw', 'decrypt_provider_keys(regclass,integer,boolean,boolean,text)', 'decryption (llmgw)', 'decrypted', 'Decrypted', 'decrypt',
         '{current_key,previous_key}'::pke_internal.token_state[],
         '{plaintext,unverified}'::pke_internal.token_state[],
         'pke_internal.llmgw_state({token}, t.token_ciphertext::text, t.id::text, t.organization_id::text)',
         'token = @extschema@.llmgw_decrypt_token(t.token_ciphertext::text, t.id::text, t.organization_id::text), '
         'token_ciphertext = NULL',
         'false',
         'llmgw_decrypt_token(text, text, text)',
         '@extschema@.llmgw_decrypt_token(t.token_ciphertext::text, t.id::text, t.organization_id::text)',
         'ARRAY[t.token_ciphertext::text, t.token_masked::text]',
         'pke_internal.llmgw_key_id_of(t.token_ciphertext::text, t.id::text, t.organization_id::text)',
         '@extschema@.llmgw_key_id()', 'key id',
         '{id,provider,token,token_ciphertext,token_hash,token_masked,organization_id}'::text[], '{}'::text[],
         '{token,token_ciphertext}'::text[], '{token_ciphertext}'::text[],
         'Rolling back to plaintext needs column token: after the gateway''s final migration, add it back first '
         '(ALTER TABLE provider_key ADD COLUMN token text, ALTER COLUMN token_ciphertext DROP NOT NULL).',
         ', soft-deleted ones included',
         llmgw_unverified,
         NULL,
         '{format=llmgw}'::text[],
         NULL),
        ('reencrypt', 'llmgw', 'reencrypt_provider_keys(regclass,integer,boolean,boolean,text)', 're-encryption (llmgw)', 'reencrypted', 'Re-encrypted', 're-encrypt',
         '{previous_key}'::pke_internal.token_state[],
         '{current_key}'::pke_internal.token_state[],
         'pke_internal.llmgw_state({token}, t.token_ciphertext::text, t.id::text, t.organization_id::text)',
         '(token_ciphertext, token_hash) = (SELECT r.token_ciphertext, r.token_hash '
         'FROM pke_internal.llmgw_reencrypt(t.token_ciphertext::text, t.id::text, t.organization_id::text) r)',
         'false',
         NULL, NULL, 'ARRAY[t.token_ciphertext::text, t.token_masked::text]',
         'pke_internal.llmgw_key_id_of(t.token_ciphertext::text, t.id::text, t.organization_id::text)',
         '@extschema@.llmgw_key_id()', 'key id',
         '{id,provider,token_ciphertext,token_hash,organization_id}'::text[], '{token}'::text[],
         '{token_ciphertext,token_hash}'::text[], '{}'::text[],
         'Rotation needs id, provider, token_ciphertext, token_hash and organization_id (the gateway''s rollout or final schema).',
         ', soft-deleted ones included: a row left under an older secret stops opening once that secret is dropped',
         llmgw_unverified,
         'No provider key needs an older secret any more: GATEWAY_API_KEY_HASH_SECRET can be cut down to its first '
         '(current) secret, on the gateway and on this server.',
         '{format=llmgw}'::text[],
         NULL)
      ) AS v(name, format, entry_point, job, done_word, past, verb, todo, target, state_sql, set_sql, deleted_sql,
             reveals, plain_sql, stored_sql, key_id_sql, key_sql, key_word, reads, optional, writes, sets_null,
             table_hint, found_note, unverified_text, retire_note, guard_args, notice_sql)
     WHERE v.format = format_name
    LOOP
        found_format := true;
        EXIT WHEN m.name = mode_name;
    END LOOP;
    IF NOT found_format THEN
        RAISE EXCEPTION 'unknown token format "%"', format_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The formats are ''base64'' (the seed guide''s: column token, key ENCRYPTION_KEY) and ''llmgw'' (the gateway''s current: token_ciphertext, token_hash, token_masked, keyring GATEWAY_API_KEY_HASH_SECRET).';
    END IF;
    IF m.name IS DISTINCT FROM mode_name THEN
        RAISE EXCEPTION 'unknown mode "%"', mode_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The modes are encrypt, decrypt and reencrypt.';
    END IF;
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
