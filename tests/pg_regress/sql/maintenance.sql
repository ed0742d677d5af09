-- Maintenance commands and the report. From PostgreSQL 17 on, ANALYZE, CLUSTER, CREATE INDEX,
-- REFRESH MATERIALIZED VIEW, REINDEX and VACUUM run with search_path = pg_catalog, pg_temp, and
-- the new MAINTAIN privilege (and role pg_maintain) lets a non-owner run them.
-- What stays the same on every major: the engine's functions pin search_path themselves, so a
-- materialized view over the report that names its table refreshes anywhere, whoever runs it.
-- What differs (maintenance_1.out is 17 and later): a view that leaves the table to
-- search_path (table_name NULL, meaning provider_key) no longer finds it when it is filled, and
-- GRANT MAINTAIN exists.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = warning;
DROP ROLE IF EXISTS maint_role;
RESET client_min_messages;
CREATE ROLE maint_role;
CREATE SCHEMA maint;
GRANT USAGE ON SCHEMA maint TO maint_role;
SET search_path = maint, public;
CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
INSERT INTO provider_key VALUES ('m1', 'sk-maint-1', 'openai'), ('m2', encrypt_token('sk-maint-2'), 'groq');

-- Names its table: refreshes on every major
CREATE MATERIALIZED VIEW key_states AS
    SELECT state, keys FROM provider_keys_encryption_report('maint.provider_key') WHERE keys > 0;
CALL encrypt_provider_keys('maint.provider_key', verbose => false);
REFRESH MATERIALIZED VIEW key_states;
SELECT * FROM key_states ORDER BY state;

-- Leaves the table to search_path. Filling the view (REFRESH, or CREATE without WITH NO DATA)
-- uses the caller's search_path up to 16, and pg_catalog, pg_temp from 17 on: no provider_key
-- there, so on 17+ the view cannot be filled. Name the table in such views.
CREATE MATERIALIZED VIEW key_states_by_path AS
    SELECT state, keys FROM provider_keys_encryption_report() WHERE keys > 0
    WITH NO DATA;
REFRESH MATERIALIZED VIEW key_states_by_path;
SELECT * FROM key_states_by_path ORDER BY state;

-- ANALYZE and VACUUM of the table are unaffected on every major
ANALYZE provider_key;
VACUUM provider_key;
SELECT count(*) FILTER (WHERE is_encrypted_token(token)) AS encrypted FROM provider_key;

-- MAINTAIN (17+): a non-owner may refresh the view; it runs as the view's owner, and the
-- report's pinned search_path still holds. Before 17 the privilege does not exist, and only
-- the owner may refresh.
GRANT MAINTAIN ON key_states TO maint_role;
SET ROLE maint_role;
REFRESH MATERIALIZED VIEW maint.key_states;
RESET ROLE;
SELECT * FROM key_states ORDER BY state;
-- Nor does MAINTAIN on the table count as a way to run code as the caller (it is not one:
-- what maintenance runs, it runs as the table's owner), so a run is not refused.
GRANT MAINTAIN ON provider_key TO maint_role;
CALL reencrypt_provider_keys('maint.provider_key', verbose => false);

RESET search_path;
DROP SCHEMA maint CASCADE;
DROP OWNED BY maint_role;
DROP ROLE maint_role;
