-- "Completed" means every key is encrypted, whatever the table holds: row security, triggers
-- that write the old value back, code owned by someone else, rules, read-only transactions and
-- missing privileges are each one clear answer up front, or an honest "incomplete" at the end.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
CREATE ROLE c_owner LOGIN;
CREATE ROLE c_mallory LOGIN;
CREATE ROLE c_app LOGIN;
-- mallory can create objects in a schema of its own (one on the caller's search path would do)
CREATE SCHEMA c_evil;
GRANT USAGE, CREATE ON SCHEMA c_evil TO c_mallory;

-- 1. Row-level security. A multi-tenant table whose owner forces its tenant policy on itself:
-- a run as the owner would see no row (no tenant is set) and would say "completed: total=0".
-- It is refused up front, with the way out.
CREATE TABLE c_rls (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL,
                    status text DEFAULT 'active', organization_id text);
INSERT INTO c_rls VALUES ('r1', 'sk-rls-tenant-a', 'openai', 'active', 'org-a'),
                         ('r2', 'sk-rls-tenant-b', 'anthropic', 'active', 'org-b');
ALTER TABLE c_rls OWNER TO c_owner;
ALTER TABLE c_rls ENABLE ROW LEVEL SECURITY;
ALTER TABLE c_rls FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON c_rls USING (organization_id = current_setting('app.org', true));
SET ROLE c_owner;
CALL encrypt_provider_keys('c_rls');
-- the report and a dry run are refused the same way: they too would count only what a policy shows
SELECT * FROM provider_keys_encryption_report('c_rls');
CALL encrypt_provider_keys('c_rls', dry_run => true);
RESET ROLE;
-- following the HINT
CREATE ROLE pke_owner BYPASSRLS NOLOGIN; ALTER TABLE public.c_rls OWNER TO pke_owner; GRANT SELECT, INSERT, UPDATE, DELETE ON public.c_rls TO c_owner;
SET ROLE pke_owner; CALL encrypt_provider_keys('c_rls'); RESET ROLE;
-- the former owner, the application, is now held to the tenant policy like every other session
SET ROLE c_owner; SELECT count(*) AS rows_the_app_sees_without_a_tenant FROM c_rls; RESET ROLE;
SELECT id, is_encrypted_token(token) AS encrypted FROM c_rls ORDER BY id;
-- without FORCE, the owner is not subject to the policy; a role it granted UPDATE to is
ALTER TABLE c_rls NO FORCE ROW LEVEL SECURITY;
ALTER TABLE c_rls OWNER TO c_owner;
GRANT SELECT, UPDATE ON c_rls TO c_app;
SET ROLE c_app;
CALL decrypt_provider_keys('c_rls');
CALL reencrypt_provider_keys('c_rls');
RESET ROLE;
-- following that HINT
SET ROLE c_owner; CALL reencrypt_provider_keys('c_rls'); RESET ROLE;

-- 2. A trigger that writes the old value back after the run's write (an AFTER trigger that
-- "syncs" token from a legacy column): counted as an error, by id, and the run is incomplete,
-- not "completed".
CREATE TABLE c_sync (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL,
                     status text DEFAULT 'active', legacy_token text);
INSERT INTO c_sync VALUES ('s1', 'sk-sync-1', 'openai', 'active', 'sk-sync-1'),
                          ('s2', 'sk-sync-2', 'openai', 'active', NULL);
CREATE FUNCTION c_sync_back() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.legacy_token IS NOT NULL AND NEW.token IS DISTINCT FROM NEW.legacy_token THEN
        UPDATE public.c_sync SET token = NEW.legacy_token WHERE id = NEW.id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER sync_legacy AFTER UPDATE ON c_sync FOR EACH ROW EXECUTE FUNCTION c_sync_back();
CALL encrypt_provider_keys('c_sync');
SELECT id, is_encrypted_token(token) AS encrypted FROM c_sync ORDER BY id;
-- the same inside a transaction block
BEGIN;
CALL encrypt_provider_keys('c_sync', verbose => false);
ROLLBACK;
-- a deferred constraint trigger does the same at COMMIT: the final scan sees it
DROP TRIGGER sync_legacy ON c_sync;
CREATE CONSTRAINT TRIGGER sync_legacy_late AFTER UPDATE ON c_sync DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION c_sync_back();
CALL encrypt_provider_keys('c_sync', verbose => false);
SELECT id, is_encrypted_token(token) AS encrypted FROM c_sync ORDER BY id;
-- fixed: the run completes, and says how it knows
DROP TRIGGER sync_legacy_late ON c_sync;
CALL encrypt_provider_keys('c_sync', verbose => false);

-- 3. Code that the table runs, owned by a role that cannot act as the caller. mallory writes a
-- function; a superuser attaches it to their own table.
SET ROLE c_mallory;
CREATE FUNCTION c_evil.c_audit_trg() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RETURN NEW; END $$;
CREATE FUNCTION c_evil.c_token_ok(t text) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$ SELECT true $$;
RESET ROLE;
CREATE TABLE c_trust (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO c_trust VALUES ('t1', 'sk-trust-1', 'openai');
CREATE TRIGGER audit BEFORE UPDATE ON c_trust FOR EACH ROW EXECUTE FUNCTION c_evil.c_audit_trg();
CALL encrypt_provider_keys('c_trust');
SELECT count(*) FILTER (WHERE is_encrypted_token(token)) AS encrypted FROM c_trust;
-- following the HINT
ALTER FUNCTION c_evil.c_audit_trg() OWNER TO root;
CALL encrypt_provider_keys('c_trust');
-- a CHECK constraint, an index expression, a generated column and a trigger's WHEN clause
-- calling mallory's function: each is named, with what runs it
UPDATE c_trust SET token = decrypt_token(token);
ALTER TABLE c_trust ADD CONSTRAINT token_ok CHECK (c_evil.c_token_ok(token));
CALL encrypt_provider_keys('c_trust', verbose => false);
ALTER TABLE c_trust DROP CONSTRAINT token_ok;
CREATE INDEX c_trust_expr ON c_trust ((c_evil.c_token_ok(provider)));
CALL encrypt_provider_keys('c_trust', verbose => false);
DROP INDEX c_trust_expr;
ALTER TABLE c_trust ADD COLUMN ok boolean GENERATED ALWAYS AS (c_evil.c_token_ok(token)) STORED;
CALL encrypt_provider_keys('c_trust', verbose => false);
ALTER TABLE c_trust DROP COLUMN ok;
CREATE TRIGGER audit_when BEFORE UPDATE ON c_trust FOR EACH ROW WHEN (c_evil.c_token_ok(NEW.token))
    EXECUTE FUNCTION suppress_redundant_updates_trigger();
CALL encrypt_provider_keys('c_trust', verbose => false);
DROP TRIGGER audit_when ON c_trust;
-- an operator of mallory's in a CHECK constraint: the operator and its function
SET ROLE c_mallory;
CREATE FUNCTION c_evil.c_same(a text, b text) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$ SELECT a = b $$;
CREATE OPERATOR c_evil.=== (LEFTARG = text, RIGHTARG = text, FUNCTION = c_evil.c_same);
RESET ROLE;
ALTER TABLE c_trust ADD CONSTRAINT not_empty CHECK (NOT (token OPERATOR(c_evil.===) ''));
CALL encrypt_provider_keys('c_trust', verbose => false);
ALTER TABLE c_trust DROP CONSTRAINT not_empty;
-- nothing of mallory's left: it runs, and nothing was written before
SELECT count(*) FILTER (WHERE is_encrypted_token(token)) AS encrypted FROM c_trust;
CALL encrypt_provider_keys('c_trust', verbose => false);
-- a dry run writes nothing, so it runs no code of the table: allowed
CREATE FUNCTION c_evil.c_noop_trg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
ALTER FUNCTION c_evil.c_noop_trg() OWNER TO c_mallory;
CREATE TRIGGER audit2 BEFORE UPDATE ON c_trust FOR EACH ROW EXECUTE FUNCTION c_evil.c_noop_trg();
CALL decrypt_provider_keys('c_trust', dry_run => true, verbose => false);
CALL decrypt_provider_keys('c_trust', verbose => false);
DROP TRIGGER audit2 ON c_trust;

-- A table owned by a role that cannot act as the caller (the gateway's own tables, run by a
-- superuser): its triggers and constraints are that role's to change
CREATE TABLE c_owned (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text);
INSERT INTO c_owned VALUES ('o1', 'sk-owned-1', 'openai', 'active');
ALTER TABLE c_owned OWNER TO c_owner;
CALL encrypt_provider_keys('c_owned');
-- following the HINT
SET ROLE c_owner; CALL encrypt_provider_keys('c_owned', verbose => false); RESET ROLE;
DROP TABLE c_owned;

-- 4. A rule would rewrite the run's UPDATE into something else
CREATE TABLE c_rule (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO c_rule VALUES ('q1', 'sk-rule-1', 'openai');
CREATE RULE keep_tokens AS ON UPDATE TO c_rule DO INSTEAD NOTHING;
CALL encrypt_provider_keys('c_rule');
-- following the HINT
DROP RULE keep_tokens ON c_rule;
CALL encrypt_provider_keys('c_rule', verbose => false);

-- 5. Conditions that would fail every row are one ERROR before the first row
CREATE TABLE c_ro (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO c_ro SELECT 'ro' || g, 'sk-ro-' || g, 'openai' FROM generate_series(1, 50) g;
SET default_transaction_read_only = on;
CALL encrypt_provider_keys('c_ro');
-- a dry run and the report work on a read-only connection
CALL encrypt_provider_keys('c_ro', dry_run => true, verbose => false);
SELECT state, keys FROM provider_keys_encryption_report('c_ro') WHERE keys > 0;
-- following the HINT
SET default_transaction_read_only = off;
BEGIN READ ONLY;
CALL encrypt_provider_keys('c_ro', verbose => false);
ROLLBACK;
-- following the HINT
BEGIN READ WRITE;
CALL encrypt_provider_keys('c_ro', verbose => false);
ROLLBACK;
-- a role without EXECUTE on a function every row's write calls
GRANT SELECT, UPDATE ON c_ro TO c_app;
REVOKE EXECUTE ON FUNCTION encrypt_token(text) FROM PUBLIC;
SET ROLE c_app;
CALL encrypt_provider_keys('c_ro');
RESET ROLE;
GRANT EXECUTE ON FUNCTION encrypt_token(text) TO PUBLIC;
SELECT count(*) FILTER (WHERE is_encrypted_token(token)) AS encrypted FROM c_ro;
SET ROLE c_app;
CALL encrypt_provider_keys('c_ro', verbose => false);
RESET ROLE;

-- 6. The same for the gateway's llmgw format: its rollout schema, a tenant policy forced on
-- the owner, and an AFTER trigger that puts the plaintext back into token (an old gateway's
-- "dual write").
CREATE TABLE c_gw (id text PRIMARY KEY, token text, token_ciphertext text, token_masked text, token_hash text,
                   provider text NOT NULL, status text DEFAULT 'active', organization_id text, legacy text);
INSERT INTO c_gw (id, token, provider, organization_id, legacy)
    VALUES ('g1', 'sk-gw-1', 'openai', 'org-a', 'sk-gw-1'), ('g2', 'sk-gw-2', 'openai', 'org-b', NULL);
ALTER TABLE c_gw OWNER TO c_owner;
ALTER TABLE c_gw ENABLE ROW LEVEL SECURITY;
ALTER TABLE c_gw FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON c_gw USING (organization_id = current_setting('app.org', true));
SET ROLE c_owner;
CALL encrypt_provider_keys('c_gw', format => 'llmgw');
RESET ROLE;
ALTER TABLE c_gw DISABLE ROW LEVEL SECURITY;
CREATE FUNCTION c_gw_dual_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.legacy IS NOT NULL AND NEW.token IS NULL THEN
        UPDATE public.c_gw SET token = NEW.legacy, token_ciphertext = NULL WHERE id = NEW.id;
    END IF;
    RETURN NULL;
END $$;
ALTER FUNCTION c_gw_dual_write() OWNER TO c_owner;
CREATE TRIGGER dual_write AFTER UPDATE ON c_gw FOR EACH ROW EXECUTE FUNCTION c_gw_dual_write();
SET ROLE c_owner;
CALL encrypt_provider_keys('c_gw', format => 'llmgw');
RESET ROLE;
SELECT id, token IS NULL AS token_moved, token_ciphertext LIKE 'llmgw:v2:%' AS sealed FROM c_gw ORDER BY id;
DROP TRIGGER dual_write ON c_gw;
SET ROLE c_owner;
CALL encrypt_provider_keys('c_gw', format => 'llmgw', verbose => false);
RESET ROLE;

-- 7. What an attacker's review found (0.2.1), each now one clear answer.
-- A condition that fails every row of a batch is one ERROR, not a WARNING per row: a column too
-- narrow for a token,
CREATE TABLE c_narrow (id text PRIMARY KEY, token varchar(40) NOT NULL, provider text NOT NULL, status text);
INSERT INTO c_narrow SELECT 'n' || lpad(g::text, 3, '0'), 'sk-' || md5(g::text), 'openai', 'active' FROM generate_series(1, 30) g;
CALL encrypt_provider_keys('c_narrow', batch_size => 20);
-- following the HINT
ALTER TABLE c_narrow ALTER COLUMN token TYPE text;
CALL encrypt_provider_keys('c_narrow', verbose => false);
-- a trusted trigger that names its table without a schema (the run's search_path is pinned),
CREATE TABLE c_audit_log (id text);
CREATE TABLE c_audited (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text);
INSERT INTO c_audited SELECT 'a' || lpad(g::text, 3, '0'), 'sk-' || md5(g::text), 'openai', 'active' FROM generate_series(1, 30) g;
CREATE FUNCTION c_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO c_audit_log VALUES (NEW.id); RETURN NEW; END $$;
CREATE TRIGGER audit BEFORE UPDATE ON c_audited FOR EACH ROW EXECUTE FUNCTION c_audit();
CALL encrypt_provider_keys('c_audited');
-- following the HINT
ALTER FUNCTION c_audit() SET search_path = public;
CALL encrypt_provider_keys('c_audited', verbose => false);
SELECT count(*) AS audited FROM c_audit_log;
-- but a few rows failing alone are still rows' problems, reported by id
CREATE TABLE c_some (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text,
                     CHECK (id <> 's003' OR token LIKE 'sk-%'));
INSERT INTO c_some SELECT 's' || lpad(g::text, 3, '0'), 'sk-' || md5(g::text), 'openai', 'active' FROM generate_series(1, 5) g;
CALL encrypt_provider_keys('c_some', verbose => false);
-- a domain of someone else's on a generated column runs that role's code on every write
SET ROLE c_mallory;
CREATE FUNCTION c_evil.len_ok(n integer) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$ SELECT true $$;
CREATE DOMAIN c_evil.token_length AS integer CHECK (c_evil.len_ok(VALUE));
RESET ROLE;
CREATE TABLE c_dom (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text,
                    token_len c_evil.token_length GENERATED ALWAYS AS (length(token)) STORED);
INSERT INTO c_dom (id, token, provider) VALUES ('d1', 'sk-dom-1', 'openai');
CALL encrypt_provider_keys('c_dom');
DROP TABLE c_dom;
-- a foreign key that points at token would copy every plaintext of a decrypt into its table
CREATE TABLE c_ref (id text PRIMARY KEY, token text NOT NULL UNIQUE, provider text NOT NULL, status text);
INSERT INTO c_ref VALUES ('f1', encrypt_token('sk-ref-1'), 'openai', 'active');
GRANT SELECT, REFERENCES ON c_ref TO c_mallory;
CALL decrypt_provider_keys('c_ref');
-- following the HINT
REVOKE REFERENCES ON public.c_ref FROM c_mallory;
CREATE TABLE c_copy (tok text REFERENCES c_ref (token) ON UPDATE CASCADE);
INSERT INTO c_copy SELECT token FROM c_ref;
CALL decrypt_provider_keys('c_ref');
-- following the HINT
ALTER TABLE public.c_copy DROP CONSTRAINT c_copy_tok_fkey;
DROP TABLE c_copy;
CALL decrypt_provider_keys('c_ref', verbose => false);
-- objects someone else left in this session's temporary schema (under SET ROLE) would be
-- found first by a trusted trigger's unqualified names
GRANT TEMPORARY ON DATABASE provider_keys_encrypt_regress TO c_mallory;
SET ROLE c_mallory;
CREATE TEMP TABLE c_audit_log (id text);
RESET ROLE;
CALL encrypt_provider_keys('c_some', verbose => false);
-- following the HINT
DISCARD TEMP;
CALL encrypt_provider_keys('c_some', verbose => false);
-- following the HINT (the row named above fails its table's CHECK constraint)
ALTER TABLE c_some DROP CONSTRAINT c_some_check;
CALL encrypt_provider_keys('c_some', verbose => false);
-- an AFTER trigger that writes back every row: named rows stop after 100
CREATE TABLE c_flood (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text, legacy text);
INSERT INTO c_flood SELECT 'w' || lpad(g::text, 3, '0'), 'sk-' || md5(g::text), 'openai', 'active', 'sk-' || md5(g::text) FROM generate_series(1, 120) g;
CREATE FUNCTION c_flood_back() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE public.c_flood SET token = legacy WHERE id = NEW.id AND token IS DISTINCT FROM legacy; RETURN NULL; END $$;
CREATE TRIGGER back AFTER UPDATE OF token ON c_flood FOR EACH ROW EXECUTE FUNCTION c_flood_back();
\set VERBOSITY terse
CALL encrypt_provider_keys('c_flood', verbose => false);
\set VERBOSITY default
DROP TABLE c_narrow, c_audit_log, c_audited, c_some, c_ref, c_flood;
DROP FUNCTION c_audit(), c_flood_back();
DROP DOMAIN c_evil.token_length;
DROP FUNCTION c_evil.len_ok(integer);
REVOKE TEMPORARY ON DATABASE provider_keys_encrypt_regress FROM c_mallory;

-- 8. An overload on the caller's search path (issue 21, item 4). mallory can create in c_evil,
-- which a superuser's search_path lists before the extension's schema; her procedure takes the
-- table name as text, which the untyped literal prefers over regclass, and then calls ours.
CREATE TABLE c_sp (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text);
INSERT INTO c_sp VALUES ('p1', 'sk-path-1', 'openai', 'active');
SET ROLE c_mallory;
CREATE PROCEDURE c_evil.encrypt_provider_keys(table_name text) LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'mallory''s procedure ran as %', current_user;
    CALL public.encrypt_provider_keys(table_name::regclass, verbose => false);
END $$;
RESET ROLE;
SET search_path = c_evil, public;
CALL encrypt_provider_keys('c_sp');
-- following the HINT: the schema-qualified call runs ours only (and still names what is on the path)
UPDATE c_sp SET token = decrypt_token(token);
CALL public.encrypt_provider_keys('c_sp', verbose => false);
SELECT * FROM public.provider_keys_encryption_report('c_sp') WHERE keys > 0;
RESET search_path;
DROP PROCEDURE c_evil.encrypt_provider_keys(text);
-- a decoy provider_key in a schema the caller's path lists first, owned by mallory: a run or a
-- report without a table name refuses instead of answering for it
CREATE SCHEMA c_app;
CREATE TABLE c_app.provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text);
INSERT INTO c_app.provider_key VALUES ('k1', 'sk-real-1', 'openai', 'active');
SET ROLE c_mallory;
CREATE TABLE c_evil.provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text);
RESET ROLE;
SET search_path = c_evil, c_app, public;
SELECT * FROM provider_keys_encryption_report() WHERE keys > 0;
CALL encrypt_provider_keys(dry_run => true);
-- following the HINT
CALL public.encrypt_provider_keys(table_name => 'c_app.provider_key', verbose => false);
RESET search_path;
DROP TABLE c_evil.provider_key, c_app.provider_key, c_sp;
DROP SCHEMA c_app;

DROP TABLE c_rls, c_sync, c_trust, c_rule, c_ro, c_gw;
DROP FUNCTION c_sync_back(), c_gw_dual_write(), c_evil.c_audit_trg(), c_evil.c_token_ok(text), c_evil.c_noop_trg();
DROP OPERATOR c_evil.=== (text, text);
DROP FUNCTION c_evil.c_same(text, text);
DROP SCHEMA c_evil;
DROP ROLE c_owner, c_mallory, c_app, pke_owner;
