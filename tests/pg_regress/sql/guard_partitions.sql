-- The guard on a partitioned table protects every partition, or the run says which one it
-- does not (issue 21, item 5); a guard trigger that could never work is refused when it is
-- created, not at the application's first write (item 8). As a table owner who is not a
-- superuser, as the gateway's own tables are.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
CREATE ROLE gp_owner LOGIN;
CREATE SCHEMA gp AUTHORIZATION gp_owner;
SET ROLE gp_owner;
CREATE TABLE gp.provider_key (id text PRIMARY KEY, token text, provider text NOT NULL, status text DEFAULT 'active')
    PARTITION BY HASH (id);
CREATE TABLE gp.p1 PARTITION OF gp.provider_key FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE gp.p2 PARTITION OF gp.provider_key FOR VALUES WITH (MODULUS 2, REMAINDER 1);
INSERT INTO gp.provider_key (id, token, provider) SELECT 'k' || g, 'sk-part-' || g, 'openai' FROM generate_series(1, 6) g;
CALL public.encrypt_provider_keys('gp.provider_key', guard => true, verbose => false);
SELECT relation, enabled, covers_writes FROM public.provider_keys_guard_status('gp.provider_key');

-- the owner disables the guard's copy on one partition: the run refuses, naming it
ALTER TABLE gp.p2 DISABLE TRIGGER provider_keys_encrypt_guard;
CALL public.encrypt_provider_keys('gp.provider_key', guard => true, verbose => false);
-- following the HINT
ALTER TABLE gp.p2 ENABLE TRIGGER provider_keys_encrypt_guard;
CALL public.encrypt_provider_keys('gp.provider_key', guard => true, verbose => false);

-- a partition attached later gets the guard from PostgreSQL (a clone, enabled), and a plaintext
-- routed to it is encrypted on write
CREATE TABLE gp.p3 (id text PRIMARY KEY, token text, provider text NOT NULL, status text DEFAULT 'active');
ALTER TABLE gp.provider_key DETACH PARTITION gp.p2;
ALTER TABLE gp.provider_key ATTACH PARTITION gp.p3 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
SELECT relation, enabled, covers_writes FROM public.provider_keys_guard_status('gp.provider_key');
INSERT INTO gp.provider_key (id, token, provider) VALUES ('k3x', 'sk-routed-late', 'openai');
SELECT tableoid::regclass AS partition, public.is_encrypted_token(token) AS encrypted
  FROM gp.provider_key WHERE id = 'k3x';
-- a table that already has a trigger of that name cannot be attached (PostgreSQL refuses)
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON gp.p2
    FOR EACH ROW EXECUTE FUNCTION public.provider_keys_encrypt_guard('mode=reject');
ALTER TABLE gp.provider_key DETACH PARTITION gp.p3;
ALTER TABLE gp.provider_key ATTACH PARTITION gp.p2 FOR VALUES WITH (MODULUS 2, REMAINDER 1);

-- a guard with an argument it cannot read is refused when it is created (0.2.0 created it,
-- and the application's next INSERT failed, and every one after it)
CREATE TABLE gp.plain (id text PRIMARY KEY, token text, provider text NOT NULL, status text);
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON gp.plain
    FOR EACH ROW EXECUTE FUNCTION public.provider_keys_encrypt_guard('mode=rejekt');
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token ON gp.plain
    FOR EACH ROW EXECUTE FUNCTION public.provider_keys_encrypt_guard('format=llmgw', 'format=base64');
-- fired the wrong way: refused too
CREATE TRIGGER provider_keys_encrypt_guard AFTER INSERT OR UPDATE ON gp.plain
    FOR EACH ROW EXECUTE FUNCTION public.provider_keys_encrypt_guard();
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE ON gp.plain
    FOR EACH STATEMENT EXECUTE FUNCTION public.provider_keys_encrypt_guard();
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR DELETE ON gp.plain
    FOR EACH ROW EXECUTE FUNCTION public.provider_keys_encrypt_guard();
-- following the HINT
CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON gp.plain
    FOR EACH ROW EXECUTE FUNCTION public.provider_keys_encrypt_guard('mode=reject');
INSERT INTO gp.plain VALUES ('e1', public.encrypt_token('sk-plain-1'), 'openai', 'active');
SELECT relation, mode, problem FROM public.provider_keys_guard_status('gp.plain');
-- other triggers are not the event trigger's business
CREATE FUNCTION gp.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER other AFTER INSERT ON gp.plain FOR EACH STATEMENT EXECUTE FUNCTION gp.noop();
RESET ROLE;
DROP SCHEMA gp CASCADE;
DROP ROLE gp_owner;
