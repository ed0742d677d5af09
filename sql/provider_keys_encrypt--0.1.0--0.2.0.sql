-- provider_keys_encrypt 0.1.0 -> 0.2.0, hand-written. An upgrade must equal a fresh 0.2.0
-- install (tests/integration/upgrade.test.mjs compares every member object).
\echo Use "ALTER EXTENSION provider_keys_encrypt UPDATE" to load this file. \quit

-- 0.1.0's engine internals lived in the extension's schema, executable by PUBLIC. They go;
-- the 0.2.0 engine lives in pke_internal. The three procedures gained arguments (format, and
-- guard for encrypting), so their 0.1.0 signatures go too: privileges an administrator granted
-- on them (EXECUTE on decrypt_provider_keys, say) must be granted again on the new ones. The
-- report gained an argument (format) and columns (token_format, key_id): it is dropped here and
-- created again below.
DROP PROCEDURE @extschema@.encrypt_provider_keys(regclass, integer, boolean, boolean, boolean);
DROP PROCEDURE @extschema@.decrypt_provider_keys(regclass, integer, boolean, boolean);
DROP PROCEDURE @extschema@.reencrypt_provider_keys(regclass, integer, boolean, boolean);
DROP FUNCTION @extschema@.provider_keys_encryption_report(regclass, boolean);
DROP PROCEDURE @extschema@._pke_run(text, regclass, integer, boolean, boolean, boolean);
DROP FUNCTION @extschema@._pke_batch(text, regclass, smallint[], text, text[], integer, boolean, boolean, boolean, bigint);
DROP FUNCTION @extschema@._pke_check_table(regclass, boolean);
DROP FUNCTION @extschema@._pke_table(regclass);
DROP FUNCTION @extschema@._pke_scrub(text, text);
DROP FUNCTION @extschema@._pke_token_state(text);
DROP FUNCTION @extschema@._pke_reencrypt(text);
DROP FUNCTION @extschema@._pke_may_commit();
DROP FUNCTION @extschema@._pke_subxact_status();

-- encrypt_token, decrypt_token, is_encrypted_token, provider_keys_encrypt_fingerprint and
-- provider_keys_encrypt_keys are unchanged.

-- Runs first (bootstrap). The extension's private schema and the types the engine shares.

-- Tokens carry UTF-8 text, exactly as the gateway's Node code writes it: refuse to install into
-- a database whose encoding would turn plaintexts into something else.
DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
        RAISE EXCEPTION 'provider_keys_encrypt requires a UTF8 database, not %', pg_catalog.getdatabaseencoding()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Tokens hold UTF-8 text, as the gateway writes them. Create the database with ENCODING ''UTF8''.';
    END IF;
END
$$;

-- The internals live here, out of the user's schemas. Only the extension's owner (a
-- superuser: the extension is not trusted) can create objects in it, so no role can plant an
-- overload or an operator where the engine looks. Privileges: see privileges.sql.
CREATE SCHEMA pke_internal;
COMMENT ON SCHEMA pke_internal IS
'provider_keys_encrypt internals: not an API, may change in any release.';

-- The schema the public functions go to must be one where nobody but superusers can create
-- objects: a role that can create there can create an overload (encrypt_provider_keys(text),
-- say) that a superuser's `CALL encrypt_provider_keys('t')` would pick over ours, before any of
-- our code runs. (PostgreSQL 15's default public schema qualifies when the database owner is a
-- superuser.) schema_writers() names the roles that are not superusers and can create there
-- (PUBLIC included): CREATE EXTENSION refuses such a schema, and every run warns when a GRANT
-- made later has opened it (run_start).
CREATE FUNCTION pke_internal.schema_writers()
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT string_agg(DISTINCT CASE WHEN w.grantee = '0'::oid THEN 'PUBLIC' ELSE quote_ident(r.rolname::text) END, ', ')
      FROM (SELECT CASE WHEN g.grantee = 'pg_database_owner'::regrole::oid THEN d.datdba ELSE g.grantee END AS grantee
              FROM (SELECT n.nspowner AS grantee FROM pg_namespace n
                     WHERE n.oid = '@extschema@'::regnamespace::oid
                    UNION
                    SELECT a.grantee FROM pg_namespace n, aclexplode(n.nspacl) a
                     WHERE n.oid = '@extschema@'::regnamespace::oid
                       AND a.privilege_type = 'CREATE') g,
                   pg_database d
             WHERE d.datname = current_database()) w
      LEFT JOIN pg_roles r ON r.oid = w.grantee
     WHERE w.grantee = '0'::oid OR NOT r.rolsuper
$fn$;

DO $$
DECLARE
    writers text := pke_internal.schema_writers();
BEGIN
    IF writers IS NOT NULL THEN
        RAISE WARNING 'schema @extschema@ is writable by roles that are not superusers: %', writers
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'A role that can create objects in the extension''s schema can plant an overload that a superuser''s call would run.',
                  HINT = 'Install it into a schema of its own: CREATE SCHEMA pke; CREATE EXTENSION provider_keys_encrypt SCHEMA pke; (and add pke to search_path), or REVOKE CREATE ON SCHEMA @extschema@ from those roles.';
    END IF;
END
$$;

-- The one vocabulary for a stored value's state, shared by the Rust code (engine.rs,
-- TOKEN_STATE_LABELS), the engine, the report and the messages.
CREATE TYPE pke_internal.token_state AS ENUM (
    'plaintext',     -- not a token: to be encrypted
    'current_key',   -- a token that authenticates under the current key
    'previous_key',  -- a token that authenticates under a previous key: to be rotated
    'unverified'     -- shaped like a token, but authenticates under no configured key
);

-- One engine mode (encrypt, decrypt, re-encrypt) for one token format: everything the engine
-- needs to know about it, built in one place (modes.sql). The SQL fragments read the row as t.
CREATE TYPE pke_internal.mode AS (
    name text,                         -- encrypt | decrypt | reencrypt
    format text,                       -- base64 (the seed guide's) | llmgw (the gateway's current)
    entry_point text,                  -- the public procedure's signature: EXECUTE on it is required
    job text,                          -- 'encryption migration', for the banner and summary
    done_word text,                    -- 'encrypted', for the summary
    past text,                         -- 'Encrypted', for a row's NOTICE
    verb text,                         -- 'encrypt', for a row's WARNING
    todo pke_internal.token_state[],   -- the states this mode writes
    target pke_internal.token_state[], -- the states a written row must end in
    state_sql text,                    -- the state of row t, an SQL expression
    set_sql text,                      -- the SET list that moves row t
    deleted_sql text,                  -- true for rows this mode leaves alone (soft-deleted)
    reveals text,                      -- the decrypting function (signature) the mode needs EXECUTE
                                       -- on, because it writes plaintext; NULL: it writes none
    plain_sql text,                    -- row t's plaintext, to scrub from messages (when reveals)
    stored_sql text,                   -- row t's stored secrets (text[]), to scrub from messages
    key_id_sql text,                   -- the public id of the key row t's token belongs to (report)
    key_sql text,                      -- the current key's public id (raises when no key)
    key_word text,                     -- what key_sql shows: 'key fingerprint' | 'key id'
    reads text[],                      -- columns read: must exist, text or varchar, readable
    optional text[],                   -- columns read when the table has them ({token} in the SQL)
    writes text[],                     -- columns written: UPDATE privilege
    sets_null text[],                  -- columns set to NULL: must be nullable
    table_hint text,                   -- the HINT when a column of reads is missing
    found_note text,                   -- appended to 'Found N provider keys to check'
    unverified_text text,              -- 'Provider key K for provider P <this>: left unchanged'
    retire_note text,                  -- rotation only: said once no row needs an older key
    guard_args text[],                 -- the guard trigger's arguments for this format (guard => true)
    notice_sql text                    -- NULL, or an expression run_start evaluates: a non-NULL
                                       -- result is a NOTICE before the run (what it cannot see)
);

-- A run between batches: what the committing procedure carries from one step to the next.
-- The procedure only passes it along (no operator, no unqualified name: it cannot carry a
-- SET search_path clause); every computation on it happens in run.sql's functions.
CREATE TYPE pke_internal.run AS (
    mode text,
    format text,
    tbl regclass,
    batch_size integer,
    dry_run boolean,
    row_notices boolean,      -- verbose: a NOTICE per row written
    encrypt_unverified boolean,
    may_commit boolean,
    do_commit boolean,        -- commit after this step (may_commit and not a dry run)
    done boolean,
    after_id text,            -- keyset position: the last id of the last batch
    found bigint,             -- rows to check, counted at the start
    examined bigint,
    written bigint,
    errors bigint,
    previous bigint,
    unverified bigint,
    warned bigint,
    changed bigint,           -- rows changed or deleted by someone else first
    started timestamptz,
    last_progress timestamptz
);

-- What one batch did.
CREATE TYPE pke_internal.batch_result AS (
    examined bigint,
    written bigint,
    previous bigint,
    unverified bigint,
    errors bigint,
    warned bigint,
    changed bigint,
    last_id text              -- NULL: no rows were left
);

-- What the batch statement returns: counts over the batch's rows (read in the statement's
-- snapshot) and over the rows it wrote, with the ids to name in messages when asked for.
CREATE TYPE pke_internal.batch_rows AS (
    examined bigint,
    todo bigint,
    previous bigint,
    unverified bigint,
    unverified_ids text[],
    unverified_providers text[],
    last_id text,
    written bigint,
    written_ids text[],
    written_providers text[],
    overridden_ids text[],    -- written, but a trigger stored something else than the mode's target
    overridden_providers text[]
);

CREATE FUNCTION pke_internal.base64_check_notice()
    RETURNS text
    LANGUAGE c STABLE PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'base64_check_notice_wrapper';
COMMENT ON FUNCTION pke_internal.base64_check_notice() IS
    'Engine internal: NULL, or why the llmgw backfill cannot recognise base64 tokens (ENCRYPTION_KEY not set).';

CREATE  FUNCTION "llmgw_decrypt_token"(
	"token" TEXT, /* Option < & str > */
	"id" TEXT, /* Option < & str > */
	"organization_id" TEXT /* Option < & str > */
) RETURNS text /* Option < SecretText > */
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'llmgw_decrypt_token_wrapper';

CREATE  FUNCTION "llmgw_encrypt_token"(
	"plaintext" TEXT, /* Option < & str > */
	"id" TEXT, /* Option < & str > */
	"organization_id" TEXT /* Option < & str > */
) RETURNS TEXT /* Option < String > */
VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'llmgw_encrypt_token_wrapper';

CREATE  FUNCTION "llmgw_key_id"() RETURNS TEXT /* String */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'llmgw_key_id_wrapper';

CREATE FUNCTION pke_internal.llmgw_key_id_of(token_ciphertext text, id text, organization_id text)
    RETURNS text
    LANGUAGE c STABLE PARALLEL SAFE COST 10
    AS 'MODULE_PATHNAME', 'llmgw_key_id_of_wrapper';

CREATE  FUNCTION "llmgw_mask_token"(
	"plaintext" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'llmgw_mask_token_wrapper';

CREATE FUNCTION pke_internal.llmgw_reencrypt(token_ciphertext text, id text, organization_id text)
    RETURNS TABLE (token_ciphertext text, token_hash text)
    LANGUAGE c VOLATILE PARALLEL SAFE ROWS 1
    AS 'MODULE_PATHNAME', 'llmgw_reencrypt_wrapper';

CREATE FUNCTION pke_internal.llmgw_state(token text, token_ciphertext text, id text, organization_id text)
    RETURNS pke_internal.token_state
    LANGUAGE c STABLE PARALLEL SAFE COST 10
    AS 'MODULE_PATHNAME', 'llmgw_state_wrapper';
COMMENT ON FUNCTION pke_internal.llmgw_state(text, text, text, text) IS
    'Engine internal: the state of a row in the llmgw format (plaintext, current_key, previous_key or unverified).';

CREATE  FUNCTION "llmgw_token_hash"(
	"plaintext" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'llmgw_token_hash_wrapper';

CREATE FUNCTION pke_internal.flush_wal() RETURNS void
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pke_flush_wal_wrapper';

CREATE FUNCTION pke_internal.guard_settings(nargs smallint, args bytea)
RETURNS TABLE (mode text, format text, unverified text, watches text[], problem text)
    LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'pke_guard_settings_wrapper';
COMMENT ON FUNCTION pke_internal.guard_settings(smallint, bytea) IS
    'Engine internal: a guard trigger''s settings from pg_trigger.tgnargs and tgargs, and the columns whose UPDATE it must fire on.';

CREATE FUNCTION pke_internal.may_commit() RETURNS boolean
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pke_may_commit_wrapper';

CREATE FUNCTION pke_internal.reencrypt(token text) RETURNS text
    LANGUAGE c STRICT VOLATILE PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'pke_reencrypt_wrapper';

CREATE FUNCTION pke_internal.subxact_status() RETURNS TABLE (cached integer, overflowed boolean)
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pke_subxact_status_wrapper';

CREATE FUNCTION pke_internal.token_key_id(token text) RETURNS text
    LANGUAGE c STRICT STABLE PARALLEL SAFE COST 10
    AS 'MODULE_PATHNAME', 'pke_token_key_id_wrapper';

CREATE FUNCTION pke_internal.token_state(token text) RETURNS pke_internal.token_state
    LANGUAGE c STRICT STABLE PARALLEL SAFE COST 10
    AS 'MODULE_PATHNAME', 'pke_token_state_wrapper';
COMMENT ON FUNCTION pke_internal.token_state(text) IS
    'Engine internal: plaintext, current_key, previous_key or unverified.';

-- Each mode of each token format, described once. Everything that differs between encrypting,
-- decrypting and re-encrypting, and between the formats, is a column of this one VALUES list
-- (the columns are explained in types.sql, type pke_internal.mode); nothing else in the engine
-- branches on a mode's or a format's name. An unknown mode or format is an error, never a
-- default.
--
-- The formats:
--   base64  the seed guide's: base64(nonce || tag || ciphertext) in column token, key
--           ENCRYPTION_KEY (+ provider_keys_encrypt.previous_keys). Soft-deleted rows are left
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
        '(move those with CALL decrypt_provider_keys(format => ''base64'') first), or the row has no token at all';
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
         'No provider key needs a previous key any more: provider_keys_encrypt.previous_keys can be emptied.',
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
         'run and nothing is left to encrypt; rotate with CALL reencrypt_provider_keys(format => ''llmgw'').',
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

-- Which table a run works on, and everything checked before any row is read or written.
-- A global problem is one ERROR with its own SQLSTATE here, never a WARNING per row later.

-- The checks, in order: a table without inheritance children (a unique index on the parent
-- does not cover them; partitions are fine); the columns the mode reads (its format says
-- which), typed text or varchar, readable; the columns it sets to NULL, nullable; the columns
-- it writes, updatable; a unique index on id; id NOT NULL; and nobody who could make the table
-- run code with the caller's rights (check_table_trust). (The caller's right to the mode
-- itself is checked by pke_internal.mode.) writes => false (a dry run, the report) skips the
-- write privileges.
CREATE FUNCTION pke_internal.check_table(tbl regclass, m pke_internal.mode, writes boolean)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    col text;
    required boolean;
    typ regtype;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'relation "provider_key" does not exist'
            USING ERRCODE = 'undefined_table',
                  HINT = 'Check search_path, or name the table: CALL encrypt_provider_keys(table_name => ''myschema.provider_key'').';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tbl AND c.relkind IN ('r', 'p')) THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = 'wrong_object_type';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_inherits i ON i.inhparent = c.oid
                WHERE c.oid = tbl AND c.relkind = 'r') THEN
        RAISE EXCEPTION 'table % has inheritance children', tbl
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Its unique index on id does not cover the children. Run the procedure on each table of the hierarchy, or use declarative partitioning.';
    END IF;
    FOR col, required IN
        SELECT x.c, x.req
          FROM (SELECT u.c, true AS req, u.o FROM unnest(m.reads) WITH ORDINALITY AS u(c, o)
                UNION ALL
                SELECT u.c, false, 1000 + u.o FROM unnest(m.optional) WITH ORDINALITY AS u(c, o)) x
         ORDER BY x.o
    LOOP
        SELECT a.atttypid::regtype INTO typ
          FROM pg_attribute a
         WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            CONTINUE WHEN NOT required;
            RAISE EXCEPTION 'column "%" of relation % does not exist', col, tbl
                USING ERRCODE = 'undefined_column', HINT = m.table_hint;
        END IF;
        IF typ NOT IN ('text'::regtype, 'character varying'::regtype) THEN
            RAISE EXCEPTION 'column "%" of relation % must be text or varchar, not %', col, tbl, typ
                USING ERRCODE = 'datatype_mismatch';
        END IF;
        IF NOT has_column_privilege(tbl, col, 'SELECT') THEN
            RAISE EXCEPTION 'permission denied to read column "%" of table %', col, tbl
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF writes AND col = ANY (m.writes) AND NOT has_column_privilege(tbl, col, 'UPDATE') THEN
            RAISE EXCEPTION 'permission denied to update column "%" of table %', col, tbl
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END LOOP;
    FOREACH col IN ARRAY m.sets_null LOOP
        IF EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
                      AND a.attnotnull) THEN
            RAISE EXCEPTION 'column "%" of relation % is NOT NULL, and format % sets it to NULL', col, tbl, m.format
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = format('Each row keeps its key in exactly one column, as in the gateway''s rollout schema: ALTER TABLE %s ALTER COLUMN %I DROP NOT NULL;', tbl, col);
        END IF;
    END LOOP;
    -- The walk orders, bounds and compares ids in the column's own collation: ids that compare
    -- equal must be equal, and the unique index must order them that way (its collation, the
    -- default operator class), or a batch's id range would hold rows the batch did not choose.
    IF EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation
                WHERE a.attrelid = tbl AND a.attname = 'id' AND NOT c.collisdeterministic) THEN
        RAISE EXCEPTION 'column "id" of relation % has a nondeterministic collation', tbl
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'A run walks the table in id order, and needs ids that compare equal only when they are equal. Give id a deterministic collation (ALTER TABLE … ALTER COLUMN id TYPE text COLLATE "default").';
    END IF;
    IF NOT EXISTS (SELECT 1
                     FROM pg_index i
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                     JOIN pg_opclass oc ON oc.oid = i.indclass[0]
                    WHERE i.indrelid = tbl AND i.indisunique AND i.indisvalid AND i.indnkeyatts = 1
                      AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = 'id'
                      AND i.indcollation[0] = a.attcollation AND oc.opcdefault) THEN
        RAISE EXCEPTION 'relation % has no unique index on column "id"', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'The index must be on id alone, in the column''s own collation and with the default operator class.',
                  HINT = format('A run walks the table in id order. Add one with: ALTER TABLE %s ADD PRIMARY KEY (id);', tbl);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = 'id' AND a.attnotnull) THEN
        RAISE EXCEPTION 'column "id" of relation % may be NULL', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('A run walks the table in id order and would never reach rows without one. Add: ALTER TABLE %s ALTER COLUMN id SET NOT NULL;', tbl);
    END IF;
    PERFORM pke_internal.check_table_trust(tbl, writes);
END
$fn$;

-- Who may put code in the table's way. Everything that runs while a run reads or writes the
-- table runs with the caller's rights: triggers (even a built-in trigger function's WHEN clause
-- can call query_to_xml), rules, row-level security policies, CHECK constraints, index
-- expressions and the support functions of the column types' operator classes, generated
-- columns — in the table and in every partition. Listing "code" is a losing game, so the rule
-- is about people: every role that can change any of that — the owner of each relation of the
-- tree, and each role granted TRIGGER on one — must be a role that could already act as the
-- caller (pg_has_role(role, current_user, 'USAGE'): the caller itself, a role the caller's
-- rights already include, or a superuser). Otherwise the run refuses before touching a row,
-- and the HINT says to run it as the owner. Reads (the report, a dry run) only meet row-level
-- security policies, so they are held to the rule only where a policy applies to the caller.
CREATE FUNCTION pke_internal.check_table_trust(tbl regclass, writes boolean)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    untrusted text;
    owner_name text;
BEGIN
    IF NOT writes AND NOT EXISTS (
        WITH RECURSIVE tree(oid) AS (
            SELECT tbl::oid
            UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
        SELECT 1 FROM tree JOIN pg_class c ON c.oid = tree.oid
         WHERE c.relrowsecurity
           AND NOT EXISTS (SELECT 1 FROM pg_roles r
                            WHERE r.rolname = current_user AND (r.rolsuper OR r.rolbypassrls))) THEN
        RETURN;  -- a read that no policy applies to runs no table code
    END IF;
    WITH RECURSIVE tree(oid) AS (
        SELECT tbl::oid
        UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid),
    who(rel, role_oid, what) AS (
        SELECT c.oid, c.relowner, 'owner'
          FROM tree JOIN pg_class c ON c.oid = tree.oid
        UNION ALL
        SELECT c.oid, a.grantee, 'TRIGGER privilege'
          FROM tree JOIN pg_class c ON c.oid = tree.oid, aclexplode(c.relacl) a
         WHERE a.privilege_type = 'TRIGGER')
    SELECT string_agg(format('%s (%s of %s)', CASE WHEN w.role_oid = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END,
                             w.what, w.rel::regclass), ', ' ORDER BY w.rel, w.what)
      INTO untrusted
      FROM who w LEFT JOIN pg_roles r ON r.oid = w.role_oid
     WHERE w.role_oid = 0 OR NOT pg_has_role(w.role_oid, current_user, 'USAGE');
    IF untrusted IS NOT NULL THEN
        SELECT r.rolname INTO owner_name FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = tbl;
        RAISE EXCEPTION 'table % can be changed by roles that cannot act as you: %', tbl, untrusted
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Its triggers, rules, policies, constraints and indexes would run with your privileges, and those roles control them.',
                  HINT = format('Run it as the table''s owner: SET ROLE %I; CALL ...; RESET ROLE;', owner_name);
    END IF;
END
$fn$;

CREATE FUNCTION provider_keys_encrypt_guard() RETURNS trigger
    LANGUAGE c
    AS 'MODULE_PATHNAME', 'provider_keys_encrypt_guard_wrapper';
COMMENT ON FUNCTION provider_keys_encrypt_guard() IS
'The guard: BEFORE INSERT OR UPDATE OF id, token, status ... FOR EACH ROW (format=llmgw: UPDATE OF id, token). Encrypts a plaintext token on write (format=llmgw: moves it into token_ciphertext, token_hash and token_masked; mode=reject: refuses it); tokens and deleted rows pass (llmgw: rows with token NULL pass).';

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
           w.written, w.written_ids, w.written_providers, w.overridden_ids, w.overridden_providers
      FROM a,
           (SELECT count(*) FILTER (WHERE w.landed) AS written,
                   array_agg(w.key ORDER BY w.key) FILTER (WHERE w.landed AND $5) AS written_ids,
                   array_agg(w.provider ORDER BY w.key) FILTER (WHERE w.landed AND $5) AS written_providers,
                   array_agg(w.key ORDER BY w.key) FILTER (WHERE NOT w.landed) AS overridden_ids,
                   array_agg(w.provider ORDER BY w.key) FILTER (WHERE NOT w.landed) AS overridden_providers
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
    CASE WHEN dry_run THEN 'true' ELSE 'false' END);

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

-- write_none: only count the rows (the mode's todo emptied), for a batch given up on.
CREATE FUNCTION pke_internal.batch_apply(
    mode_name text, format_name text, encrypt_unverified boolean, tbl regclass,
    after_id text, ids text[], batch_size integer, write_none boolean,
    dry_run boolean, may_commit boolean, list_written boolean, list_unverified boolean)
RETURNS pke_internal.batch_rows
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(mode_name, format_name, encrypt_unverified, tbl);
    todo pke_internal.token_state[] := CASE WHEN write_none THEN '{}' ELSE m.todo END;
    stmt text := pke_internal.batch_sql(m, tbl, pke_internal.batch_range(after_id, ids), dry_run OR write_none,
                                        pke_internal.table_may_rewrite(tbl));
    r pke_internal.batch_rows;
    ok boolean;
BEGIN
    IF may_commit OR dry_run THEN
        -- one savepoint around the whole batch; the caller commits
        BEGIN
            EXECUTE stmt INTO r USING after_id, batch_size, ids, todo, list_written, list_unverified, m.target;
            ok := true;
        EXCEPTION WHEN OTHERS THEN
            ok := false;
        END;
    ELSE
        -- inside the caller's transaction: try in a savepoint that is always rolled back,
        -- then write for real at the caller's level (no written subtransaction is kept)
        BEGIN
            EXECUTE stmt INTO r USING after_id, batch_size, ids, todo, list_written, list_unverified, m.target;
            RAISE SQLSTATE 'PK000';
        EXCEPTION
            WHEN SQLSTATE 'PK000' THEN ok := true;
            WHEN OTHERS THEN ok := false;
        END;
        IF ok THEN
            EXECUTE stmt INTO r USING after_id, batch_size, ids, todo, list_written, list_unverified, m.target;
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
-- back; WARN about each failing row (its secrets scrubbed) and return the others. give_up:
-- rows that pass alone keep failing together (a statement-level trigger, a constraint between
-- rows): report every row to write as failing, write none.
CREATE FUNCTION pke_internal.batch_isolate(
    mode_name text, format_name text, encrypt_unverified boolean, tbl regclass,
    after_id text, ids text[], batch_size integer, give_up boolean,
    OUT good text[], OUT errors bigint, OUT range_end text)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(mode_name, format_name, encrypt_unverified, tbl);
    one_sql text := format('UPDATE %s t SET %s WHERE t.id::text = $1 AND NOT (%s) AND %s = ANY ($2)',
                           tbl, m.set_sql, m.deleted_sql, m.state_sql);
    x record;
    e_state text;
    e_msg text;
    plain text;
BEGIN
    good := '{}';
    errors := 0;
    FOR x IN EXECUTE format(
        'SELECT t.id::text AS key, %s AS stored, t.provider::text AS prov,
                CASE WHEN %s THEN NULL ELSE %s END AS st
           FROM %s t WHERE %s ORDER BY t.id LIMIT $2',
        m.stored_sql, m.deleted_sql, m.state_sql, tbl, pke_internal.batch_range(after_id, ids))
        USING after_id, batch_size, ids
    LOOP
        range_end := x.key;
        IF x.st IS NULL OR NOT x.st = ANY (m.todo) THEN
            good := good || x.key;  -- nothing to write: counted when the batch runs again
        ELSIF give_up THEN
            errors := errors + 1;
            RAISE WARNING 'Failed to % provider key % for provider %: its write fails only together with other rows; left unchanged',
                m.verb, x.key, x.prov;
        ELSE
            BEGIN
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
                    RAISE WARNING 'Failed to % provider key % for provider % (SQLSTATE %): %',
                        m.verb, x.key, x.prov, e_state, pke_internal.scrub(e_msg, x.stored || plain);
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
                RAISE WARNING 'Provider key % for provider % looks like a token but authenticates under no configured key: % it as plaintext',
                    x.key, x.prov, CASE WHEN dry_run THEN 'would encrypt' ELSE 'encrypted' END
                    USING HINT = 'If it is a token written under another key, check ENCRYPTION_KEY and the previous keys; decrypt_provider_keys() gives the stored value back unchanged.';
            ELSE
                RAISE WARNING 'Provider key % for provider % %: left unchanged', x.key, x.prov, m.unverified_text;
            END IF;
        END LOOP;
    END IF;
    IF r.overridden_ids IS NOT NULL THEN
        FOR x IN SELECT * FROM unnest(r.overridden_ids, r.overridden_providers) AS u(key, prov) LOOP
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

-- One batch, start to end: apply; if it fails, isolate the failing rows and apply again on
-- the others (at most three attempts); then the messages.
CREATE FUNCTION pke_internal.batch(
    mode_name text, format_name text, encrypt_unverified boolean, tbl regclass,
    after_id text, batch_size integer, dry_run boolean, notices boolean, may_commit boolean,
    warn_left bigint)
RETURNS pke_internal.batch_result
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(mode_name, format_name, encrypt_unverified, tbl);
    r pke_internal.batch_rows;
    iso record;
    ids text[];
    range_end text;
    failed bigint := 0;
    res pke_internal.batch_result;
BEGIN
    FOR attempt IN 1..3 LOOP
        r := pke_internal.batch_apply(mode_name, format_name, encrypt_unverified, tbl, after_id, ids,
                                      batch_size, false, dry_run, may_commit, notices, warn_left > 0);
        EXIT WHEN r.examined IS NOT NULL;  -- it ran
        iso := pke_internal.batch_isolate(mode_name, format_name, encrypt_unverified, tbl, after_id, ids,
                                          batch_size, attempt = 3);
        failed := failed + iso.errors;
        range_end := COALESCE(range_end, iso.range_end);
        ids := iso.good;
        IF attempt = 3 THEN
            -- count the rows that are left as they are, and write none of them
            r := pke_internal.batch_apply(mode_name, format_name, encrypt_unverified, tbl, after_id, ids,
                                          batch_size, true, dry_run, may_commit, false, false);
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
    res.warned := pke_internal.batch_messages(m, r, dry_run, warn_left);
    RETURN res;
END
$fn$;

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

-- After a first batch that had nothing to write or warn about (an all-skipped re-run, most
-- likely): is that true of the whole table? One sequential scan classifies every row once;
-- when no row is in a state the mode writes and none is unverified, that scan ends the run,
-- with the counts a batch-by-batch walk would find in the same snapshot, at the cost of a
-- plain classification scan instead of a walk by index. Rows written after this snapshot are
-- the guard's job or the next run's, exactly as for rows written behind a walk's position.
-- A first run pays none of this: its first batch has rows to write.
-- One classification per row, and a plan that may run in parallel: the four counts are one
-- sum (a simple CASE evaluates the state once, and each state adds 1 in its own 12 decimal
-- digits), where count(*) FILTER per state would classify each row once per FILTER, and a
-- GROUP BY state is planned as if every row were its own group (a function of a unique
-- column), so serially, with a hash table sized for that.
CREATE FUNCTION pke_internal.run_idle_check(r pke_internal.run)
RETURNS pke_internal.run
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(r.mode, r.format, r.encrypt_unverified, r.tbl);
    digits constant numeric := 1e12;  -- room for any table's count of one state
    total numeric;
    n bigint[];  -- per state, in the enum's order
    todo bigint := 0;
BEGIN
    EXECUTE format('SELECT sum(CASE %s WHEN ''plaintext'' THEN 1 WHEN ''current_key'' THEN 1e12
                                       WHEN ''previous_key'' THEN 1e24 WHEN ''unverified'' THEN 1e36
                                       ELSE 0 END)
                      FROM %s t WHERE NOT (%s)',
                   m.state_sql, r.tbl, m.deleted_sql)
        INTO total;
    total := coalesce(total, 0);
    n := ARRAY[mod(total, digits), mod(div(total, digits), digits),
               mod(div(total, digits ^ 2), digits), div(total, digits ^ 3)]::bigint[];
    FOR i IN 1 .. 4 LOOP
        IF (enum_range(NULL::pke_internal.token_state))[i] = ANY (m.todo) THEN
            todo := todo + n[i];
        END IF;
    END LOOP;
    IF todo = 0 AND n[4] = 0 THEN  -- nothing to write, no unverified row to warn about
        r.examined := n[1] + n[2] + n[3] + n[4];
        r.previous := n[3];
        r.done := true;
    END IF;
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
    b := pke_internal.batch(r.mode, r.format, r.encrypt_unverified, r.tbl, r.after_id, r.batch_size,
                            r.dry_run, r.row_notices, r.may_commit, warn_limit - r.warned);
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

-- The summary: total = done + skipped + errors, and what else the operator must know. After a
-- rotation that wrote, the whole table is checked again: only then can it say that no row
-- needs an older key (rows written meanwhile by a gateway still sealing under an older secret
-- would be missed by counting alone).
CREATE FUNCTION pke_internal.run_summary(r pke_internal.run)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    m pke_internal.mode := pke_internal.mode(r.mode, r.format, r.encrypt_unverified, r.tbl);
    summary text;
    still_older bigint;
BEGIN
    IF r.unverified > r.warned THEN
        RAISE WARNING '% more unverified provider keys (warnings stopped after %)',
            r.unverified - r.warned, r.warned;
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
    summary := format('Provider key %s %s: %s', m.job,
        CASE WHEN r.dry_run THEN 'dry run completed (nothing was written)' ELSE 'completed' END, summary);
    IF r.errors > 0 THEN
        RAISE WARNING '%', summary
            USING HINT = 'The rows named above were left unchanged; fix them and run the procedure again (it skips what is done).';
    ELSE
        RAISE NOTICE '%', summary;
    END IF;
    IF m.retire_note IS NOT NULL AND NOT r.dry_run THEN
        EXECUTE format('SELECT count(*) FROM %s t WHERE NOT (%s) AND (%s) = ''previous_key''',
                       r.tbl, m.deleted_sql, m.state_sql) INTO still_older;
        IF still_older = 0 THEN
            RAISE NOTICE '%', m.retire_note || CASE WHEN r.unverified > 0 THEN format(
                ' (The %s unverified provider keys open under none of the configured keys, older or not.)', r.unverified)
                ELSE '' END;
        ELSE
            RAISE WARNING '% provider keys still open only under an older key: keep every key configured until a run has re-encrypted them', still_older
                USING HINT = 'Rows written meanwhile under an older key (a gateway instance whose first secret is still the old one?) are re-encrypted by the next run.';
        END IF;
    END IF;
END
$fn$;

-- The run. It COMMITs after every batch when it may (CALLed outside a transaction block), so
-- it cannot carry a SET search_path clause: it contains no operator and no unqualified name,
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
    r := pke_internal.run_start(mode_name, format_name,
                                COALESCE(table_name, pg_catalog.to_regclass('provider_key')),
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
    PERFORM pke_internal.run_summary(r);
END
$proc$;

-- What users call: three procedures with the same arguments and the same guarantees, and the
-- report. They hold no logic: each is one call into pke_internal, with its mode named.
-- (0.2.0 added format and guard: the upgrade script drops 0.1.0's signatures.)
-- table_name NULL means provider_key, found through the caller's search_path at call time (a
-- regclass default would be resolved once, when the procedure is created).

CREATE PROCEDURE @extschema@.encrypt_provider_keys(
    table_name regclass DEFAULT NULL,
    batch_size integer DEFAULT 5000,    -- rows per batch (and per transaction outside a block)
    dry_run boolean DEFAULT false,
    verbose boolean DEFAULT true,
    encrypt_unverified boolean DEFAULT true,
    format text DEFAULT 'base64',       -- the token format: base64 (the seed guide's) or llmgw (the gateway's current)
    guard boolean DEFAULT false)        -- install the guard trigger before the first batch
LANGUAGE plpgsql
AS $proc$
BEGIN
    CALL pke_internal.run('encrypt', encrypt_provider_keys.format, encrypt_provider_keys.table_name,
                          encrypt_provider_keys.batch_size, encrypt_provider_keys.dry_run,
                          encrypt_provider_keys.verbose, encrypt_provider_keys.encrypt_unverified,
                          encrypt_provider_keys.guard);
END
$proc$;

COMMENT ON PROCEDURE @extschema@.encrypt_provider_keys(regclass, integer, boolean, boolean, boolean, text, boolean) IS
'Encrypt, in place, every plaintext key of a provider_key table. format base64: in column token, rows whose status is ''deleted'' left alone; format llmgw: the gateway''s backfill, from token into token_ciphertext, token_hash and token_masked, on every row. Idempotent; commits every batch_size rows when called outside a transaction block. guard => true first installs the guard trigger, so that no plaintext written meanwhile survives.';

CREATE PROCEDURE @extschema@.decrypt_provider_keys(
    table_name regclass DEFAULT NULL,
    batch_size integer DEFAULT 5000,
    dry_run boolean DEFAULT false,
    verbose boolean DEFAULT true,
    format text DEFAULT 'base64')
LANGUAGE plpgsql
AS $proc$
BEGIN
    CALL pke_internal.run('decrypt', decrypt_provider_keys.format, decrypt_provider_keys.table_name,
                          decrypt_provider_keys.batch_size, decrypt_provider_keys.dry_run,
                          decrypt_provider_keys.verbose, false, false);
END
$proc$;

COMMENT ON PROCEDURE @extschema@.decrypt_provider_keys(regclass, integer, boolean, boolean, text) IS
'Rollback of encrypt_provider_keys: turn every token (under the current or a previous key) back into its plaintext (format llmgw: back into column token). Refuses while a guard trigger is installed on the table.';

CREATE PROCEDURE @extschema@.reencrypt_provider_keys(
    table_name regclass DEFAULT NULL,
    batch_size integer DEFAULT 5000,
    dry_run boolean DEFAULT false,
    verbose boolean DEFAULT true,
    format text DEFAULT 'base64')
LANGUAGE plpgsql
AS $proc$
BEGIN
    CALL pke_internal.run('reencrypt', reencrypt_provider_keys.format, reencrypt_provider_keys.table_name,
                          reencrypt_provider_keys.batch_size, reencrypt_provider_keys.dry_run,
                          reencrypt_provider_keys.verbose, false, false);
END
$proc$;

COMMENT ON PROCEDURE @extschema@.reencrypt_provider_keys(regclass, integer, boolean, boolean, text) IS
'Key rotation: re-encrypt under the current key every token written under a previous key (format llmgw: every llmgw:v1 token and every v2 token under an older secret, and its token_hash).';

-- The report: rows per state (the token_state labels, plus deleted for a format that skips
-- soft-deleted rows) and per key id (the public id of the key a token belongs to: an older key
-- id with rows left means that key is still needed), optionally per provider. It uses the
-- format's re-encrypt descriptor, which needs the fewest columns (it works on the gateway's
-- final schema). format NULL: llmgw when the table has the gateway's token_ciphertext column,
-- else base64.
CREATE FUNCTION pke_internal.report(tbl regclass, by_provider boolean, format_name text)
RETURNS TABLE (token_format text, provider text, state text, key_id text, keys bigint)
LANGUAGE plpgsql STABLE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    fmt text := COALESCE(format_name,
        CASE WHEN EXISTS (SELECT 1 FROM pg_attribute a
                           WHERE a.attrelid = tbl AND a.attname = 'token_ciphertext' AND a.attnum > 0
                             AND NOT a.attisdropped)
             THEN 'llmgw' ELSE 'base64' END);
    m pke_internal.mode := pke_internal.mode('reencrypt', fmt, false, tbl, check_privileges => false);
    current_key text;
BEGIN
    PERFORM pke_internal.check_table(tbl, m, false);
    EXECUTE 'SELECT ' || m.key_sql INTO current_key;  -- a clear error when there is no key
    RETURN QUERY EXECUTE format($q$
        WITH classified AS (
            SELECT CASE WHEN $1 THEN t.provider::text END AS provider, x.state,
                   CASE WHEN x.state IN ('current_key', 'previous_key', 'unverified') THEN %4$s END AS key_id
              FROM %1$s t,
                   LATERAL (SELECT CASE WHEN %2$s THEN 'deleted' ELSE (%3$s)::text END AS state) x),
        counted AS (
            SELECT c.provider, c.state, c.key_id, count(*) AS n FROM classified c GROUP BY 1, 2, 3),
        states(state, ord) AS (
            SELECT s::text, o FROM unnest(enum_range(NULL::pke_internal.token_state)) WITH ORDINALITY AS u(s, o)
            UNION ALL SELECT 'deleted', 100 WHERE %5$L <> 'false')
        SELECT $3, r.provider, r.state, r.key_id, r.n
          FROM (SELECT c.provider, c.state, c.key_id, c.n, st.ord
                  FROM counted c JOIN states st ON st.state = c.state
                UNION ALL
                -- without by_provider, every state is shown, with 0 when no row is in it
                SELECT NULL, st.state, CASE WHEN st.state = 'current_key' THEN $2 END, 0, st.ord
                  FROM states st
                 WHERE NOT $1 AND NOT EXISTS (SELECT 1 FROM counted c WHERE c.state = st.state)) r
         ORDER BY r.provider NULLS FIRST, r.ord, r.key_id NULLS FIRST $q$,
        tbl, m.deleted_sql, m.state_sql, m.key_id_sql, m.deleted_sql)
    USING by_provider, current_key, fmt;
END
$fn$;

CREATE FUNCTION @extschema@.provider_keys_encryption_report(
    table_name regclass DEFAULT NULL,
    by_provider boolean DEFAULT false,
    format text DEFAULT NULL)          -- base64 | llmgw; NULL: what the table's columns say
RETURNS TABLE (token_format text, provider text, state text, key_id text, keys bigint)
LANGUAGE sql STABLE PARALLEL UNSAFE
AS $fn$
    SELECT * FROM pke_internal.report(COALESCE(table_name, pg_catalog.to_regclass('provider_key')), by_provider, format)
$fn$;

COMMENT ON FUNCTION @extschema@.provider_keys_encryption_report(regclass, boolean, text) IS
'Keys per state (plaintext, current_key, previous_key, unverified, and deleted for base64) and key id, optionally per provider. format: base64 or llmgw (NULL: llmgw when the table has token_ciphertext). Whether a guard is installed: provider_keys_guard_status().';

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
-- creates a trigger only with the caller's own TRIGGER privilege; scrub only replaces text; every internal that reads or writes rows takes a mode
-- by name from pke_internal.mode, which refuses an unknown mode and a caller without EXECUTE
-- on that mode's public procedure (and on the format's decrypting function when the mode
-- writes plaintext). All of them run with the caller's rights.
