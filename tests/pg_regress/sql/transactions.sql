-- Inside a transaction block (as migration tools run it): no COMMIT, everything goes with
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
-- the caller, and 200 batches leave no committed subtransaction behind (the cache overflows
-- past 64, making every snapshot on the server "suboverflowed").
CREATE TABLE pk_tx (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO pk_tx SELECT 'k' || lpad(i::text, 5, '0'), 'sk-' || md5(i::text), 'p' || (i % 3) FROM generate_series(1, 2000) i;

BEGIN;
CALL encrypt_provider_keys('pk_tx', batch_size => 10, verbose => false);
SELECT * FROM pke_internal.subxact_status();
ROLLBACK;
SELECT count(*) AS still_plaintext FROM pk_tx WHERE NOT is_encrypted_token(token);

BEGIN;
CALL encrypt_provider_keys('pk_tx', batch_size => 10, verbose => false);
COMMIT;
SELECT state, keys FROM provider_keys_encryption_report('pk_tx');

-- What the engine avoids: the naive per-row savepoint pattern overflows the cache.
BEGIN;
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT id FROM pk_tx ORDER BY id LIMIT 100 LOOP
        BEGIN
            UPDATE pk_tx SET token = token WHERE id = r.id;
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
    END LOOP;
END $$;
SELECT * FROM pke_internal.subxact_status();
ROLLBACK;
