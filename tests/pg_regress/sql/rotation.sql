-- Key rotation, step 2 of README "Key rotation": the server runs with the new key in
-- ENCRYPTION_KEY and the old one in ENCRYPTION_KEY_PREVIOUS (scripts/test starts it so).
-- tests/integration/rotation.test.mjs walks the whole rotation through server restarts.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
SHOW provider_keys_encrypt.previous_keys;
SELECT * FROM provider_keys_encrypt_keys();
CREATE TABLE pk_rot (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
-- r1, r2: written by the gateway's Node code under the old key, before the rotation
INSERT INTO pk_rot VALUES ('r1', 'QtLXRd2IzkY5AQROp3JvnJEDXArMs0EGx845gOMpUjLR9sr+', 'openai'),
                          ('r2', 'EYkk99gQB1+oK+tPPPrdiec6dYxwLCFueXHIt+7FVj7zea9N', 'mistral');
-- r3 written under the new key, r4 still plaintext
INSERT INTO pk_rot VALUES ('r3', encrypt_token('sk-new-3'), 'openai'), ('r4', 'sk-plain-4', 'openai');
SELECT state, keys FROM provider_keys_encryption_report('pk_rot');

-- encrypt skips previous-key rows (and says so); reencrypt moves them to the new key
CALL encrypt_provider_keys('pk_rot');
CALL reencrypt_provider_keys('pk_rot');
SELECT state, keys FROM provider_keys_encryption_report('pk_rot');
SELECT id, decrypt_token(token) FROM pk_rot ORDER BY id;
-- previous_key = 0: the old key can leave ENCRYPTION_KEY_PREVIOUS at the next restart

-- a token under a key the server does not have (the gateway's test-vector key) is noticed:
-- "unverified"; with encrypt_unverified => false it is left untouched
INSERT INTO pk_rot VALUES ('r5', 'AQIDBAUGBwgJCgsMjvZ1vunxh6s/ZRUrnJRca3aBd6We+5qrLcAAdiIg', 'openai');
CALL encrypt_provider_keys('pk_rot', encrypt_unverified => false, verbose => false);
SELECT state, keys FROM provider_keys_encryption_report('pk_rot');
SELECT token = 'AQIDBAUGBwgJCgsMjvZ1vunxh6s/ZRUrnJRca3aBd6We+5qrLcAAdiIg' AS untouched FROM pk_rot WHERE id = 'r5';
