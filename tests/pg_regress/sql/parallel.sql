-- The functions are labelled PARALLEL SAFE, so a parallel worker may run them: it builds its
-- own key ring from its own environment (ENCRYPTION_KEY and ENCRYPTION_KEY_PREVIOUS, inherited
-- from the postmaster) and receives the leader's settings through PostgreSQL's GUC state copy,
-- whose values pass the check hooks again in the worker. These queries force a parallel plan
-- and show that a worker ran and got the leader's answers.
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

CREATE TABLE par (id integer PRIMARY KEY, plain text NOT NULL, token text NOT NULL);
INSERT INTO par SELECT g, 'sk-par-' || g, encrypt_token('sk-par-' || g) FROM generate_series(1, 200) g;

-- decrypt_token, is_encrypted_token and the fingerprint in a worker: same results as the leader
SELECT workers_launched($$SELECT count(*) FROM par WHERE decrypt_token(token) = plain AND is_encrypted_token(token)$$) > 0 AS ran_in_a_worker;
SELECT count(*) AS decrypted_in_worker FROM par WHERE decrypt_token(token) = plain AND is_encrypted_token(token);
SELECT count(DISTINCT provider_keys_encrypt_fingerprint()) AS fingerprints FROM par;

-- encrypt_token in a worker: fresh nonces there too (no token repeats), and the leader opens them
SELECT workers_launched($$SELECT count(DISTINCT encrypt_token(plain)) FROM par$$) > 0 AS ran_in_a_worker;
CREATE TABLE par_enc AS SELECT id, plain, encrypt_token(plain) AS token FROM par;
SELECT count(DISTINCT token) AS distinct_tokens, count(*) FILTER (WHERE decrypt_token(token) = plain) AS opened FROM par_enc;

-- The previous key (ENCRYPTION_KEY_PREVIOUS) in a worker: tokens the gateway wrote under the old
-- key (rotation.sql's r1 and r2) open there.
CREATE TABLE par_old AS
    SELECT g AS id, CASE g % 2 WHEN 0 THEN 'sk-old-1' ELSE 'sk-old-2' END AS plain,
           CASE g % 2 WHEN 0 THEN 'QtLXRd2IzkY5AQROp3JvnJEDXArMs0EGx845gOMpUjLR9sr+'
                      ELSE 'EYkk99gQB1+oK+tPPPrdiec6dYxwLCFueXHIt+7FVj7zea9N' END AS token
      FROM generate_series(1, 200) g;
SELECT workers_launched($$SELECT count(*) FROM par_old WHERE decrypt_token(token) = plain$$) > 0 AS ran_in_a_worker;
SELECT count(*) AS old_key_opened_in_worker FROM par_old WHERE decrypt_token(token) = plain;

-- A key cannot reach a worker through a setting: the leader refuses it before it is stored.
SELECT sqlstate_of($$SET provider_keys_encrypt.previous_keys = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0='$$) AS set_previous_keys;

RESET ALL;
DROP TABLE par, par_enc, par_old;
DROP FUNCTION workers_launched(text);
