-- provider_keys_encrypt 0.2.0 -> 0.2.1: the hand-written part of the upgrade, what CREATE OR
-- REPLACE cannot do. scripts/upgrade-script appends every engine function and the privileges.

-- A run's state carries the final verification (run_verify), a batch's result every row it
-- wrote on a table whose triggers could rewrite it (batch_recheck). New attributes go last, as
-- in a fresh install's types.sql.
ALTER TYPE pke_internal.run ADD ATTRIBUTE verified boolean, ADD ATTRIBUTE remaining bigint;
ALTER TYPE pke_internal.batch_rows ADD ATTRIBUTE landed_ids text[];
