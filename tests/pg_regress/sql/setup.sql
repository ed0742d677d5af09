-- Runs first. The server was started with ENCRYPTION_KEY set (scripts/test), as in production.
CREATE EXTENSION provider_keys_encrypt;
-- A helper for the sessions: the SQLSTATE and message a statement raises.
CREATE FUNCTION sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
