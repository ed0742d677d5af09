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
        RAISE EXCEPTION 'schema @extschema@ is writable by roles that are not superusers: %', writers
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'A role that can create objects in the extension''s schema can plant an overload that a superuser''s call would run.',
                  HINT = 'Install it into a schema of its own: CREATE SCHEMA pke; CREATE EXTENSION provider_keys_encrypt SCHEMA pke; (and add pke to search_path), or REVOKE CREATE ON SCHEMA @extschema@ from those roles.';
    END IF;
END
$$;

-- The one vocabulary for a stored value's state, shared by the Rust code (core's
-- format::State, src/states.rs), the engine, the report and the messages.
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
    last_progress timestamptz,
    verified boolean,         -- a scan of every row after the last batch has counted what is left
    remaining bigint          -- rows that scan found still in a state the mode writes
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
    overridden_providers text[],
    landed_ids text[]         -- every row written, when the table has triggers that could rewrite it
);
