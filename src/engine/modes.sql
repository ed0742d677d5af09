-- Each mode, described once. Everything that differs between encrypting, decrypting and
-- re-encrypting is a column of this one VALUES list; nothing else in the engine branches on a
-- mode's name. An unknown mode or format is an error, never a default.
--
-- Every internal that reads or writes rows gets its mode from here, and here the caller's
-- right to the mode is checked: EXECUTE on its public procedure and, for a mode that reveals
-- plaintext, on decrypt_token. So calling an internal directly never gets around a REVOKE.
-- (check_privileges => false only serves the report, which writes nothing.)

CREATE FUNCTION pke_internal.mode(mode_name text, format_name text, encrypt_unverified boolean,
                                  check_privileges boolean DEFAULT true)
RETURNS pke_internal.mode
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode;
BEGIN
    IF format_name IS DISTINCT FROM 'base64' THEN
        RAISE EXCEPTION 'unknown token format "%"', format_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The format is ''base64'': base64(nonce || tag || ciphertext) in column token, key ENCRYPTION_KEY.';
    END IF;
    SELECT v.* INTO m
      FROM (VALUES
        ('encrypt', 'base64', 'encrypt_provider_keys(regclass,integer,boolean,boolean,boolean,text,boolean)', 'encryption migration', 'encrypted', 'Encrypted', 'encrypt',
         CASE WHEN encrypt_unverified THEN '{plaintext,unverified}' ELSE '{plaintext}' END::pke_internal.token_state[],
         '{current_key}'::pke_internal.token_state[],
         'pke_internal.token_state(t.token::text)',
         'token = @extschema@.encrypt_token(t.token::text)',
         't.status IS NOT DISTINCT FROM ''deleted''',
         false),
        ('decrypt', 'base64', 'decrypt_provider_keys(regclass,integer,boolean,boolean,text)', 'decryption', 'decrypted', 'Decrypted', 'decrypt',
         '{current_key,previous_key}'::pke_internal.token_state[],
         '{plaintext,unverified}'::pke_internal.token_state[],
         'pke_internal.token_state(t.token::text)',
         'token = @extschema@.decrypt_token(t.token::text)',
         't.status IS NOT DISTINCT FROM ''deleted''',
         true),
        ('reencrypt', 'base64', 'reencrypt_provider_keys(regclass,integer,boolean,boolean,text)', 're-encryption', 'reencrypted', 'Re-encrypted', 're-encrypt',
         '{previous_key}'::pke_internal.token_state[],
         '{current_key}'::pke_internal.token_state[],
         'pke_internal.token_state(t.token::text)',
         'token = pke_internal.reencrypt(t.token::text)',
         't.status IS NOT DISTINCT FROM ''deleted''',
         false)
      ) AS v(name, format, entry_point, job, done_word, past, verb, todo, target, state_sql, set_sql, deleted_sql, needs_decrypt)
     WHERE v.name = mode_name AND v.format = format_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown mode "%"', mode_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The modes are encrypt, decrypt and reencrypt.';
    END IF;
    IF check_privileges THEN
        -- the exact procedure (an overload someone else created has another signature)
        IF NOT has_function_privilege(format('@extschema@.%s', m.entry_point), 'EXECUTE') THEN
            RAISE EXCEPTION 'permission denied for procedure %', split_part(m.entry_point, '(', 1)
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF m.needs_decrypt AND NOT has_function_privilege('@extschema@.decrypt_token(text)', 'EXECUTE') THEN
            RAISE EXCEPTION 'permission denied for function decrypt_token'
                USING ERRCODE = 'insufficient_privilege',
                      HINT = format('%s writes plaintext: it needs EXECUTE on decrypt_token(text) too.', split_part(m.entry_point, '(', 1));
        END IF;
    END IF;
    RETURN m;
END
$fn$;
