-- provider_keys_encrypt 0.2.1 -> 0.2.2
--
-- 0.2.2 changes the library only: key variables may come from files (ENCRYPTION_KEY_FILE,
-- ENCRYPTION_KEY_PREVIOUS_FILE, GATEWAY_API_KEY_HASH_SECRET_FILE), read by the server at start.
-- The SQL surface is 0.2.1's, object for object (tests/integration/upgrade.test.mjs compares an
-- upgraded database with a fresh install), so this script has nothing to do. Install the new
-- package and restart the server before ALTER EXTENSION provider_keys_encrypt UPDATE, so that
-- every backend runs the new library.
\echo Use "ALTER EXTENSION provider_keys_encrypt UPDATE" to load this file. \quit
