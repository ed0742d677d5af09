-- A row whose write fails is rolled back alone, reported, counted; the run goes on.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
CREATE TABLE pk_fail (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO pk_fail SELECT 'id' || lpad(i::text, 3, '0'), 'sk-proj-' || md5(i::text), 'openai' FROM generate_series(1, 25) i;
CREATE FUNCTION refuse_id013() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id = 'id013' THEN
        -- a careless trigger that quotes the old value: the engine redacts it
        RAISE EXCEPTION 'row % refused (old token %)', NEW.id, OLD.token USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse BEFORE UPDATE ON pk_fail FOR EACH ROW EXECUTE FUNCTION refuse_id013();

CALL encrypt_provider_keys('pk_fail', batch_size => 10, verbose => false);
SELECT count(*) FILTER (WHERE is_encrypted_token(token)) AS encrypted,
       count(*) FILTER (WHERE NOT is_encrypted_token(token)) AS plaintext,
       bool_and(token = 'sk-proj-' || md5('13')) FILTER (WHERE id = 'id013') AS id013_unchanged
FROM pk_fail;

-- fix the cause, run again: only the failed row is left to do
DROP TRIGGER refuse ON pk_fail;
CALL encrypt_provider_keys('pk_fail', batch_size => 10);

-- the same failure inside a transaction block: still per row, no written subtransaction kept
UPDATE pk_fail SET token = decrypt_token(token);
CREATE TRIGGER refuse BEFORE UPDATE ON pk_fail FOR EACH ROW EXECUTE FUNCTION refuse_id013();
BEGIN;
CALL encrypt_provider_keys('pk_fail', batch_size => 5, verbose => false);
SELECT * FROM pke_internal.subxact_status();
SELECT count(*) FILTER (WHERE is_encrypted_token(token)) AS encrypted FROM pk_fail;
ROLLBACK;
SELECT count(*) FILTER (WHERE is_encrypted_token(token)) AS encrypted_after_rollback FROM pk_fail;

-- A trigger of the table's own owner that quietly stores something else than what the run
-- wrote: the row is not counted as encrypted, but as an error, by id.
CREATE TABLE pk_undo (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO pk_undo VALUES ('u1', 'sk-undo-1', 'openai'), ('u2', 'sk-undo-2', 'openai');
CREATE FUNCTION pk_undo_u2() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF NEW.id = 'u2' THEN NEW.token := OLD.token; END IF; RETURN NEW; END $$;
CREATE TRIGGER undo BEFORE UPDATE ON pk_undo FOR EACH ROW EXECUTE FUNCTION pk_undo_u2();
CALL encrypt_provider_keys('pk_undo', verbose => false);
SELECT id, is_encrypted_token(token) AS encrypted FROM pk_undo ORDER BY id;
