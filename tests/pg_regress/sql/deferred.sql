-- Checks deferred to COMMIT (a DEFERRABLE INITIALLY DEFERRED unique constraint) run inside the
-- run's savepoints: a failure is reported row by row, never at COMMIT with the key value in a
-- DETAIL line; the constraint's mode outlives no savepoint.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
CREATE TABLE pk_def (id text PRIMARY KEY, token text, provider text NOT NULL, status text DEFAULT 'active',
                     CONSTRAINT pk_def_token_key UNIQUE (token) DEFERRABLE INITIALLY DEFERRED);
INSERT INTO pk_def (id, token, provider) VALUES
    ('1', encrypt_token('sk-same-plaintext-0001'), 'openai'),
    ('2', encrypt_token('sk-same-plaintext-0001'), 'openai'),
    ('3', encrypt_token('sk-other-plaintext-0003'), 'anthropic');

-- Decrypting gives rows 1 and 2 the same token: they pass alone and fail together, so the
-- batch's rows are reported without a value, and left encrypted.
CALL decrypt_provider_keys('pk_def');
SELECT id, is_encrypted_token(token) AS encrypted FROM pk_def ORDER BY id;

-- The same inside a transaction block; nothing is left to fail at its COMMIT.
BEGIN;
CALL decrypt_provider_keys('pk_def', verbose => false);
COMMIT;
SELECT count(*) AS encrypted FROM pk_def WHERE is_encrypted_token(token);

-- After a run, the constraint is deferred again (the run's SET CONSTRAINTS ended with its
-- transaction): a duplicate is accepted until the check runs.
BEGIN;
INSERT INTO pk_def SELECT '4', token, provider FROM pk_def WHERE id = '1';
SELECT sqlstate_of('SET CONSTRAINTS ALL IMMEDIATE') AS at_check;
ROLLBACK;

-- A duplicate the caller's own transaction wrote before the CALL: one error before any row,
-- naming the constraint, not the key.
BEGIN;
INSERT INTO pk_def SELECT '4', token, provider FROM pk_def WHERE id = '1';
CALL decrypt_provider_keys('pk_def');
ROLLBACK;
-- following the HINT: the CALL outside a transaction block runs (and reports the rows that
-- fail together, as above)
CALL decrypt_provider_keys('pk_def', verbose => false);

-- Inside a block, a run sets the table's own deferrable constraints IMMEDIATE for the rest of
-- the caller's transaction (a deferred trigger that wrote the old value back must act inside
-- the run, where its checks see it, not at the caller's COMMIT): a duplicate written after the
-- CALL fails at once.
DELETE FROM pk_def WHERE id = '2';
BEGIN;
CALL decrypt_provider_keys('pk_def', verbose => false);
SELECT sqlstate_of($$INSERT INTO pk_def SELECT '4', token, provider FROM pk_def WHERE id = '1'$$) AS at_insert;
ROLLBACK;
SELECT count(*) AS encrypted FROM pk_def WHERE is_encrypted_token(token);

DROP TABLE pk_def;
