-- Tokens hold UTF-8 text: the extension refuses a database of another encoding.
\set VERBOSITY default
\set SHOW_CONTEXT never
SET client_min_messages = warning;
DROP DATABASE IF EXISTS pke_latin1;
CREATE DATABASE pke_latin1 ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C';
\c pke_latin1
CREATE EXTENSION provider_keys_encrypt;
SELECT count(*) AS installed FROM pg_extension WHERE extname = 'provider_keys_encrypt';
-- following the HINT
DROP DATABASE IF EXISTS pke_utf8;
CREATE DATABASE pke_utf8 ENCODING 'UTF8' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C';
\c pke_utf8
CREATE EXTENSION provider_keys_encrypt;
SELECT count(*) AS installed FROM pg_extension WHERE extname = 'provider_keys_encrypt';
\c postgres
DROP DATABASE pke_utf8;
DROP DATABASE pke_latin1;
