-- The gateway's current format, llmgw, as a user meets it. The server was started with
-- GATEWAY_API_KEY_HASH_SECRET = 'test-gateway-secret-2,test-gateway-secret-1' (scripts/test):
-- key ids fc35422a (current) and 2ef0c6fb (older). Tokens below with fixed IVs
-- were written by the gateway's Node code (tests/interop/llmgw_gateway.mjs).
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = notice;

-- The functions: labels and who may call them (decrypting is not for PUBLIC)
SELECT p.proname, pg_get_function_arguments(p.oid) AS arguments, p.provolatile AS volatility,
       p.proisstrict AS strict, p.proparallel AS parallel,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_may_execute
  FROM pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'llmgw%'
 ORDER BY 1;

SELECT llmgw_key_id();

-- Round trips, bound to the row; a NULL organization is the gateway's managed scope
SELECT llmgw_decrypt_token(llmgw_encrypt_token('sk-proj-abc', 'row-1', 'org-1'), 'row-1', 'org-1');
SELECT llmgw_decrypt_token(llmgw_encrypt_token('ключ-🔑-clé', 'row-2', NULL), 'row-2', NULL);
SELECT llmgw_decrypt_token(llmgw_encrypt_token('sk-managed', 'row-3', NULL), 'row-3', 'llmgateway:managed');
SELECT llmgw_decrypt_token(llmgw_encrypt_token('', 'row-4', 'org-1'), 'row-4', 'org-1') = '' AS empty_round_trip;
-- a fresh IV every call, and the current key id in every new token
SELECT llmgw_encrypt_token('sk-proj-abc', 'row-1', 'org-1') <> llmgw_encrypt_token('sk-proj-abc', 'row-1', 'org-1') AS differ,
       split_part(llmgw_encrypt_token('sk-proj-abc', 'row-1', 'org-1'), ':', 1) || ':' ||
       split_part(llmgw_encrypt_token('sk-proj-abc', 'row-1', 'org-1'), ':', 2) || ':' ||
       split_part(llmgw_encrypt_token('sk-proj-abc', 'row-1', 'org-1'), ':', 3) AS head;

-- Written by Node: v2 under the current secret, v2 under the older one, v1 (which carries no
-- key id: every secret is tried)
SELECT llmgw_decrypt_token('llmgw:v2:fc35422a:MDEyMzQ1Njc4OTo7:U2EO7xyw6cnB-gNJo1-F0gR-8ffgHdFpOWyy5w4:8oRQTZGc5qbAaO4TvNneGw', 'n1', 'org-1');
SELECT llmgw_decrypt_token('llmgw:v2:fc35422a:PD0-P0BBQkNERUZH:GYTLdZMxUG-ggVnDNLGn:G2J0H6wo5GIL8uz7DeYEHw', 'n2', NULL);
SELECT llmgw_decrypt_token('llmgw:v2:2ef0c6fb:AAECAwQFBgcICQoL:yeodN2szTd4Gn9Y0EWLiJn8O:zd0Y9_iZ1O_eXFmXZeuJyQ', 'g5', 'org-1');
SELECT llmgw_decrypt_token('llmgw:v1:DA0ODxAREhMUFRYX:fn0Cw1jdplxJQ_OD2IEBDfwv:IhW4Ni1vMt-0hBp3DHfAkA', 'g6', NULL);

-- token_hash (HMAC-SHA256 under the current secret; Node gives 26f835a8…) and token_masked
SELECT llmgw_token_hash('sk-node-written-ключ-🔑');
SELECT v AS plaintext, llmgw_mask_token(v) AS masked
  FROM (VALUES (''), ('abc'), ('abcdefgh'), ('sk-proj-1234567890abcdef'), ('0123456789a🔑bcdef')) AS t(v);

-- NULLs: no plaintext or token, no result; a NULL id is an error (every token is bound to
-- its row's id)
SELECT llmgw_encrypt_token(NULL, 'r', 'o') IS NULL AS e, llmgw_decrypt_token(NULL, 'r', 'o') IS NULL AS d,
       llmgw_token_hash(NULL) IS NULL AS h, llmgw_mask_token(NULL) IS NULL AS m;
SELECT llmgw_encrypt_token('sk-proj-abc', NULL, 'org-1');

-- Errors: each cause its own SQLSTATE, never a secret or a plaintext in the message.
-- Copied to another row, to another organization, or tampered: GCM cannot tell these apart.
SELECT llmgw_decrypt_token('llmgw:v2:fc35422a:MDEyMzQ1Njc4OTo7:U2EO7xyw6cnB-gNJo1-F0gR-8ffgHdFpOWyy5w4:8oRQTZGc5qbAaO4TvNneGw', 'n2', 'org-1');
SELECT sqlstate_of($$SELECT llmgw_decrypt_token('llmgw:v2:fc35422a:MDEyMzQ1Njc4OTo7:U2EO7xyw6cnB-gNJo1-F0gR-8ffgHdFpOWyy5w4:8oRQTZGc5qbAaO4TvNneGw', 'n1', 'org-2')$$) AS other_organization;
SELECT sqlstate_of($$SELECT llmgw_decrypt_token('llmgw:v2:fc35422a:MDEyMzQ1Njc4OTo7:V2EO7xyw6cnB-gNJo1-F0gR-8ffgHdFpOWyy5w4:8oRQTZGc5qbAaO4TvNneGw', 'n1', 'org-1')$$) AS tampered;
-- (the last character of a part may differ in its unused low bits and still decode to the same
-- bytes, as in Node: those tokens open)
SELECT llmgw_decrypt_token('llmgw:v2:fc35422a:MDEyMzQ1Njc4OTo7:U2EO7xyw6cnB-gNJo1-F0gR-8ffgHdFpOWyy5w5:8oRQTZGc5qbAaO4TvNneGw', 'n1', 'org-1');
-- a key id not in the keyring: named (a key id is public), with a hint
SELECT llmgw_decrypt_token('llmgw:v2:d3a37641:JCUmJygpKissLS4v:MmDpqELLHI7UrJ4IErmnNN8:6bdluzzO5B2imAupEOQNSg', 'g8', 'org-1');
-- an unknown version, a malformed token, a value that is no llmgw token at all
SELECT llmgw_decrypt_token('llmgw:v3:fc35422a:MDEyMzQ1Njc4OTo7:sHngLXMJ:8oRQTZGc5qbAaO4TvNneGw', 'n1', 'org-1');
SELECT sqlstate_of($$SELECT llmgw_decrypt_token('llmgw:v2:fc35422a:MDEyMzQ1Njc4OTo7:8oRQTZGc5qbAaO4TvNneGw', 'n1', 'org-1')$$) AS part_missing;
SELECT sqlstate_of($$SELECT llmgw_decrypt_token('llmgw:v2:FC35422A:MDEyMzQ1Njc4OTo7:sHngLXMJ:8oRQTZGc5qbAaO4TvNneGw', 'n1', 'org-1')$$) AS key_id_upper_case;
SELECT sqlstate_of($$SELECT llmgw_decrypt_token('llmgw:v2:fc35422a:MDEyMzQ1Njc4OTo7:sHng LXMJ:8oRQTZGc5qbAaO4TvNneGw', 'n1', 'org-1')$$) AS not_base64url;
SELECT sqlstate_of($$SELECT llmgw_decrypt_token('llmgw:v2:fc35422a:MDEyMzQ1Njc4:sHngLXMJ:8oRQTZGc5qbAaO4TvNneGw', 'n1', 'org-1')$$) AS short_iv;
SELECT sqlstate_of($$SELECT llmgw_decrypt_token('sk-proj-plaintext-key', 'n1', 'org-1')$$) AS not_a_token;

-- The backfill: CALL encrypt_provider_keys(format => 'llmgw') on the gateway's rollout schema
-- (token nullable, the three new columns, the XOR constraint). It moves every row with a token
-- and no ciphertext, soft-deleted ones too, and keeps updated_at.
CREATE TABLE gw_key (
    id text PRIMARY KEY,
    token text,
    token_ciphertext text,
    token_masked text,
    token_hash text,
    provider text NOT NULL,
    status text DEFAULT 'active',
    organization_id text,
    managed boolean NOT NULL DEFAULT false,
    base_url text,
    created_at timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00',
    updated_at timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00',
    CONSTRAINT gw_key_token_xor CHECK ((token IS NULL) <> (token_ciphertext IS NULL)));
INSERT INTO gw_key (id, token, token_ciphertext, token_hash, token_masked, provider, status, organization_id, managed) VALUES
    ('g1', 'sk-proj-g1-1234567890', NULL, NULL, NULL, 'openai', 'active', 'org-1', false),
    ('g2', 'sk-ant-api03-g2-abcdef', NULL, NULL, NULL, 'anthropic', 'inactive', NULL, true),
    ('g3', 'sk-deleted-g3-secret', NULL, NULL, NULL, 'openai', 'deleted', 'org-2', false),
    ('g4', 'llmgw:v2:pasted-into-the-wrong-column', NULL, NULL, NULL, 'mistral', 'active', 'org-1', false),
    ('g5', NULL, 'llmgw:v2:2ef0c6fb:AAECAwQFBgcICQoL:yeodN2szTd4Gn9Y0EWLiJn8O:zd0Y9_iZ1O_eXFmXZeuJyQ',
     '005fd67cb9daea89b5f429e2439fe19d6afdeedf0aec4adb8f5785d1960e6f2e', 'sk-older-v2-•••••', 'openai', 'active', 'org-1', false),
    ('g6', NULL, 'llmgw:v1:DA0ODxAREhMUFRYX:fn0Cw1jdplxJQ_OD2IEBDfwv:IhW4Ni1vMt-0hBp3DHfAkA',
     NULL, 'sk-older-v1-•••••', 'groq', 'deleted', NULL, true),
    ('g7', NULL, 'llmgw:v1:GBkaGxwdHh8gISIj:X_ZiNAfWAr33lpkNOFwVvcJhCHk:H6zzwt7ESvGDWpNdk50LAQ',
     NULL, 'sk-current-v1•••••', 'openai', 'active', 'org-2', false),
    ('g8', NULL, 'llmgw:v2:d3a37641:JCUmJygpKissLS4v:MmDpqELLHI7UrJ4IErmnNN8:6bdluzzO5B2imAupEOQNSg',
     NULL, 'sk-dropped-s•••••', 'openai', 'active', 'org-1', false),
    ('n1', NULL, 'llmgw:v2:fc35422a:MDEyMzQ1Njc4OTo7:U2EO7xyw6cnB-gNJo1-F0gR-8ffgHdFpOWyy5w4:8oRQTZGc5qbAaO4TvNneGw',
     '26f835a8c7922eba0340110bd4a055dbc92e4d826bc577ba138d5b23e1db19ad', 'sk-node-writ•••••', 'openai', 'active', 'org-1', false);
CREATE TABLE gw_key_plain AS SELECT id, token FROM gw_key WHERE token IS NOT NULL;

-- the report finds the format from the columns: rows per state and key id
SELECT * FROM provider_keys_encryption_report('gw_key');
CALL encrypt_provider_keys('gw_key', format => 'llmgw', dry_run => true);
CALL encrypt_provider_keys('gw_key', format => 'llmgw');
-- every moved row: token NULL, the ciphertext opens for its row to the old plaintext, the hash
-- and the mask are the gateway's, updated_at unchanged
SELECT g.id, g.status, g.token IS NULL AS token_null,
       split_part(g.token_ciphertext, ':', 2) || ':' || split_part(g.token_ciphertext, ':', 3) AS version_key,
       llmgw_decrypt_token(g.token_ciphertext, g.id, g.organization_id) = p.token AS opens,
       g.token_hash = llmgw_token_hash(p.token) AS hash_ok, g.token_masked, g.updated_at
  FROM gw_key g JOIN gw_key_plain p USING (id)
 ORDER BY g.id;
-- idempotent: a second run moves nothing
CALL encrypt_provider_keys('gw_key', format => 'llmgw', verbose => false);
SELECT * FROM provider_keys_encryption_report('gw_key');

-- Rotation, which the gateway lacks: v1 tokens and v2 tokens under the older secret are
-- sealed again under the current one, with token_hash recomputed; the summary says whether
-- the older secret is still needed (here g8's key id d3a37641 is not in the keyring at all)
CALL reencrypt_provider_keys('gw_key', format => 'llmgw');
SELECT id, split_part(token_ciphertext, ':', 2) || ':' || split_part(token_ciphertext, ':', 3) AS version_key,
       llmgw_decrypt_token(token_ciphertext, id, organization_id) AS plaintext, token_hash
  FROM gw_key WHERE id IN ('g5', 'g6', 'g7') ORDER BY id;
SELECT * FROM provider_keys_encryption_report('gw_key', by_provider => true);

-- A failing row is rolled back alone, its secrets scrubbed from the message; the run goes on
CREATE FUNCTION gw_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id = 'g1' THEN RAISE EXCEPTION 'refused % / %', OLD.token_ciphertext, NEW.token; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER gw_refuse BEFORE UPDATE ON gw_key FOR EACH ROW EXECUTE FUNCTION gw_refuse();
-- Rollback to plaintext: needs EXECUTE on llmgw_decrypt_token too
CREATE ROLE gw_operator;
GRANT SELECT, UPDATE ON gw_key TO gw_operator;
GRANT EXECUTE ON PROCEDURE decrypt_provider_keys(regclass, integer, boolean, boolean, text) TO gw_operator;
SET ROLE gw_operator;
CALL decrypt_provider_keys('gw_key', format => 'llmgw');
RESET ROLE;
CALL decrypt_provider_keys('gw_key', format => 'llmgw');
DROP TRIGGER gw_refuse ON gw_key;
SELECT id, token, token_ciphertext IS NULL AS ciphertext_null FROM gw_key ORDER BY id;

-- Forward again; the operator fixes g4 by hand first (the report named it unverified)
UPDATE gw_key SET token = 'sk-fixed-g4' WHERE id = 'g4';
CALL encrypt_provider_keys('gw_key', format => 'llmgw', verbose => false);
DELETE FROM gw_key WHERE id = 'g8';  -- its secret is gone: the gateway cannot read it either

-- The gateway's next migration: the three columns NOT NULL on every row, then token dropped
ALTER TABLE gw_key ALTER COLUMN token_ciphertext SET NOT NULL,
                   ALTER COLUMN token_hash SET NOT NULL,
                   ALTER COLUMN token_masked SET NOT NULL;
ALTER TABLE gw_key DROP COLUMN token;
-- a row the gateway wrote while an instance still had the older secret first
INSERT INTO gw_key (id, token_ciphertext, token_hash, token_masked, provider, organization_id) VALUES
    ('g9', 'llmgw:v2:2ef0c6fb:SElKS0xNTk9QUVJT:KrtOrNlZ6DcSVYhkIYw2k__9ONF0:WhaziwFdQUQ3vzRm2Vmg7Q',
     'older-hash', 'sk-older-fin•••••', 'openai', 'org-2');
-- rotation works on the final schema, and now no row needs the older secret
CALL reencrypt_provider_keys('gw_key', format => 'llmgw');
SELECT * FROM provider_keys_encryption_report('gw_key');
SELECT llmgw_decrypt_token(token_ciphertext, id, organization_id), token_hash = llmgw_token_hash('sk-older-final-schema') AS hash_ok
  FROM gw_key WHERE id = 'g9';
-- on the final schema there is nothing to encrypt, and no column to roll back to
CALL encrypt_provider_keys('gw_key', format => 'llmgw');
CALL decrypt_provider_keys('gw_key', format => 'llmgw');
-- following the HINT (in a transaction block, rolled back: the session goes on with the final schema)
BEGIN;
ALTER TABLE gw_key ADD COLUMN token text, ALTER COLUMN token_ciphertext DROP NOT NULL;
CALL public.decrypt_provider_keys('gw_key', format => 'llmgw', verbose => false);
SELECT count(*) FILTER (WHERE token IS NOT NULL AND token_ciphertext IS NULL) AS rolled_back FROM gw_key;
ROLLBACK;

-- Tables the format cannot work on: the seed guide's (no llmgw columns), a token NOT NULL
CREATE TABLE seed_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
CALL encrypt_provider_keys('seed_key', format => 'llmgw');
-- following the HINT: the gateway's rollout columns
ALTER TABLE seed_key ADD COLUMN token_ciphertext text, ADD COLUMN token_hash text, ADD COLUMN token_masked text,
                     ADD COLUMN organization_id text;
CALL encrypt_provider_keys('seed_key', format => 'llmgw');
-- following the HINT
ALTER TABLE public.seed_key ALTER COLUMN token DROP NOT NULL;
CALL public.encrypt_provider_keys('seed_key', format => 'llmgw', verbose => false);
CALL encrypt_provider_keys('seed_key', format => 'llmgw2');

-- A table encrypted in format base64 before (this extension's first format): its tokens are
-- no API keys, so the backfill leaves them in token and says how to move them; a real
-- plaintext next to them moves. Rolled back to plaintext first, they move too.
CREATE TABLE was_base64 (id text PRIMARY KEY, token text, token_ciphertext text, token_hash text,
                         token_masked text, provider text NOT NULL, status text, organization_id text);
INSERT INTO was_base64 (id, token, provider) VALUES ('b1', encrypt_token('sk-was-base64'), 'openai'),
                                                    ('b2', 'sk-plain-next-to-it', 'anthropic');
CALL encrypt_provider_keys('was_base64', format => 'llmgw');
SELECT id, decrypt_token(token) AS base64_token_opens_to, llmgw_decrypt_token(token_ciphertext, id, organization_id) AS moved
  FROM was_base64 ORDER BY id;
CALL decrypt_provider_keys('was_base64', format => 'base64');
CALL encrypt_provider_keys('was_base64', format => 'llmgw');
SELECT id, token, llmgw_decrypt_token(token_ciphertext, id, organization_id) AS moved FROM was_base64 ORDER BY id;
-- runs with nothing left to do end after one classification scan, with the counts a walk
-- would give (format base64 finds no token at all in column token here: total=0)
CALL encrypt_provider_keys('was_base64', format => 'llmgw');
CALL encrypt_provider_keys('was_base64');
-- This table has no XOR constraint: an old gateway instance can write a new plaintext key into
-- token of a row that has a ciphertext. The newest write is in token: the report counts it as
-- plaintext and the backfill seals it over the old ciphertext.
UPDATE was_base64 SET token = 'sk-new-key-from-old-code' WHERE id = 'b2';
SELECT * FROM provider_keys_encryption_report('was_base64');
CALL encrypt_provider_keys('was_base64', format => 'llmgw');
SELECT id, token, llmgw_decrypt_token(token_ciphertext, id, organization_id) AS moved,
       token_hash = llmgw_token_hash('sk-new-key-from-old-code') AS hash_ok FROM was_base64 ORDER BY id;

DROP TABLE gw_key, gw_key_plain, seed_key, was_base64;
DROP FUNCTION gw_refuse();
DROP OWNED BY gw_operator;
DROP ROLE gw_operator;
