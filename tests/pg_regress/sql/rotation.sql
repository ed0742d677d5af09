-- Key rotation: the old key becomes a previous key; reencrypt_provider_keys moves tokens over.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;
CREATE TABLE pk_rot (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
-- written under an "old" key (the one in tests/interop/make_vectors.mjs)
SET provider_keys_encrypt.encryption_key = 'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=';
INSERT INTO pk_rot VALUES ('r1', encrypt_token('sk-old-1'), 'openai'), ('r2', encrypt_token('sk-old-2'), 'mistral');
-- back to the server's key; the old one listed as previous
RESET provider_keys_encrypt.encryption_key;
SET provider_keys_encrypt.previous_keys = 'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=';
INSERT INTO pk_rot VALUES ('r3', encrypt_token('sk-new-3'), 'openai'), ('r4', 'sk-plain-4', 'openai');
SELECT * FROM provider_keys_encrypt_keys();
SELECT state, keys FROM provider_keys_encryption_report('pk_rot');

-- encrypt skips previous-key rows (and says so)
CALL encrypt_provider_keys('pk_rot');
CALL reencrypt_provider_keys('pk_rot');
SELECT state, keys FROM provider_keys_encryption_report('pk_rot');

-- the old key can go now
RESET provider_keys_encrypt.previous_keys;
SELECT id, decrypt_token(token) FROM pk_rot ORDER BY id;

-- a wrong key is noticed at once: tokens look "unverified", and are encrypted reversibly
SET provider_keys_encrypt.encryption_key = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=';
CALL encrypt_provider_keys('pk_rot', encrypt_unverified => false, verbose => false);
RESET provider_keys_encrypt.encryption_key;
SELECT state, keys FROM provider_keys_encryption_report('pk_rot');
