-- The functions are labelled PARALLEL SAFE, so a parallel worker may run them: it loads the
-- library itself, reads ENCRYPTION_KEY from its own environment and gets the leader's settings
-- (here a previous key set with SET) through PostgreSQL's GUC state copy, whose values pass the
-- check hook again in the worker. These queries force a parallel plan and show the worker
-- ran and got the same answers.
-- The setting that forces it is force_parallel_mode up to PostgreSQL 15 and
-- debug_parallel_query from 16 on (same values, on/off/regress): picked by version here, so one
-- expected output fits every major.
SELECT set_config(CASE WHEN current_setting('server_version_num')::int >= 160000
                       THEN 'debug_parallel_query' ELSE 'force_parallel_mode' END,
                  'on', false) AS forced_parallel;
SET max_parallel_workers_per_gather = 2;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;

-- Workers launched by a query, read from EXPLAIN's JSON (its keys are stable across versions;
-- the text form is not: 18 prints buffers and fractional row counts).
CREATE FUNCTION workers_launched(q text) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE plan jsonb;
BEGIN
    EXECUTE 'EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, FORMAT JSON) ' || q INTO plan;
    RETURN (SELECT sum(w::text::int) FROM jsonb_path_query(plan, 'strict $.**."Workers Launched"') w);
END $$;

CREATE TABLE par (id integer PRIMARY KEY, plain text NOT NULL, token text NOT NULL, old_token text);
INSERT INTO par SELECT g, 'sk-par-' || g, encrypt_token('sk-par-' || g), NULL FROM generate_series(1, 200) g;

-- decrypt_token, is_encrypted_token and the fingerprint in a worker: same results as the leader
SELECT workers_launched($$SELECT count(*) FROM par WHERE decrypt_token(token) = plain AND is_encrypted_token(token)$$) > 0 AS ran_in_a_worker;
SELECT count(*) AS decrypted_in_worker FROM par WHERE decrypt_token(token) = plain AND is_encrypted_token(token);
SELECT count(DISTINCT provider_keys_encrypt_fingerprint()) AS fingerprints FROM par;

-- encrypt_token in a worker: fresh nonces there too (no token repeats), and the leader opens them
SELECT workers_launched($$SELECT count(DISTINCT encrypt_token(plain)) FROM par$$) > 0 AS ran_in_a_worker;
CREATE TABLE par_enc AS SELECT id, plain, encrypt_token(plain) AS token FROM par;
SELECT count(DISTINCT token) AS distinct_tokens, count(*) FILTER (WHERE decrypt_token(token) = plain) AS opened FROM par_enc;

-- A previous key set with SET in the leader reaches the worker: tokens written under the old
-- key open there.
SET provider_keys_encrypt.encryption_key = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=';
UPDATE par SET old_token = encrypt_token(plain);
RESET provider_keys_encrypt.encryption_key;
SET provider_keys_encrypt.previous_keys = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=';
SELECT workers_launched($$SELECT count(*) FROM par WHERE decrypt_token(old_token) = plain$$) > 0 AS ran_in_a_worker;
SELECT count(*) AS old_key_opened_in_worker FROM par WHERE decrypt_token(old_token) = plain;
RESET provider_keys_encrypt.previous_keys;
SELECT sqlstate_of($$SELECT count(*) FROM par WHERE decrypt_token(old_token) = plain$$) AS without_the_previous_key;

RESET ALL;
DROP TABLE par, par_enc;
DROP FUNCTION workers_launched(text);
