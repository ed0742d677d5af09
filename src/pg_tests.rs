//! `#[pg_test]`s: what needs Rust internals inside a real PostgreSQL backend (the keyring
//! cache, the setup check, the guard's fast path, tokens made by the pure code); what a SQL
//! session sees is specified by tests/pg_regress (docs/development.md, "Where each test
//! lives"). The test server preloads the
//! library and gets its keys from its environment, the only source (scripts/test sets
//! ENCRYPTION_KEY = TEST_KEY, ENCRYPTION_KEY_PREVIOUS = PREV_KEY and
//! GATEWAY_API_KEY_HASH_SECRET = GATEWAY_SECRETS below). Each test runs in a transaction that
//! is rolled back.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use provider_keys_encrypt_core::format::base64::Keyring as Base64Ring;
    use provider_keys_encrypt_core::keys::{self, KeyError};

    /// The key scripts/test gives the test server (never used outside tests).
    const TEST_KEY: &str = "dGVzdC1rZXktcHJvdmlkZXJfa2V5c19lbmNyeXB0LTE=";
    /// The previous key scripts/test gives the test server (ENCRYPTION_KEY_PREVIOUS).
    const PREV_KEY: &str = "cHJldmlvdXMta2V5LXByb3ZpZGVyX2tleXNfZW5jcnk=";
    /// A valid key the server does not have (a wrong key).
    const OTHER_KEY: &str = "b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=";
    /// The gateway's secrets scripts/test gives the test server (GATEWAY_API_KEY_HASH_SECRET).
    const GATEWAY_SECRETS: &str = "test-gateway-secret-2,test-gateway-secret-1";

    /// Run `sql` and return the SQLSTATE it raises ("00000" if none), via a PL/pgSQL helper
    /// (catching in a subtransaction is the only clean way to observe an error in SQL).
    fn sqlstate(sql: &str) -> String {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN EXECUTE q; RETURN '00000';
             EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[sql.into()])
            .unwrap()
            .unwrap()
    }

    fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).unwrap()
    }

    /// A stored value's state, as the engine sees it (a label of pke_internal.token_state).
    fn state(value: &str) -> String {
        Spi::get_one_with_args::<String>(
            "SELECT pke_internal.token_state($1)::text",
            &[value.into()],
        )
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn non_utf8_plaintext_is_22021() {
        // a token whose plaintext is the byte 0xFF, made with the test key by the pure code
        let ring = Base64Ring::build(Some(TEST_KEY), None).unwrap();
        let token = ring.seal_bytes(b"\xff").unwrap();
        assert_eq!(
            sqlstate(&format!("SELECT decrypt_token('{token}')")),
            "22021"
        );
        assert_eq!(
            one::<bool>(&format!("SELECT is_encrypted_token('{token}')")),
            Some(true)
        );
    }

    #[pg_test]
    fn missing_key_is_55000_with_hint() {
        // The environment has a key; an explicitly blank setting falls back to it, so emulate
        // "no key at all" through the pure code path the SQL layer uses.
        assert_eq!(Base64Ring::build(None, None).err(), Some(KeyError::Missing));
        let e = crate::errors::Error::from(KeyError::Missing);
        assert_eq!(
            e.sqlstate(),
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
        );
        let msg = e.to_string();
        assert!(
            msg.contains("ENCRYPTION_KEY") && msg.contains("environment"),
            "{msg}"
        );
        assert!(e.hint().unwrap().contains("openssl rand -base64 32"));
    }

    /// A token under `key`, made by the pure code (the server only has its environment keys).
    fn token_under(key: &str, plaintext: &str) -> String {
        Base64Ring::build(Some(key), None)
            .unwrap()
            .seal_bytes(plaintext.as_bytes())
            .unwrap()
    }

    #[pg_test]
    fn rotation_with_a_previous_key_from_the_environment() {
        // written under the previous key (ENCRYPTION_KEY_PREVIOUS): opens, rotates
        let old_token = token_under(PREV_KEY, "sk-rotate");
        assert_eq!(state(&old_token), "previous_key");
        assert_eq!(
            one::<String>(&format!("SELECT decrypt_token('{old_token}')")).as_deref(),
            Some("sk-rotate")
        );
        let new_token =
            one::<String>(&format!("SELECT pke_internal.reencrypt('{old_token}')")).unwrap();
        assert_eq!(state(&new_token), "current_key");
        assert_eq!(
            one::<String>(&format!("SELECT decrypt_token('{new_token}')")).as_deref(),
            Some("sk-rotate")
        );
        // written under a key the server does not have: unverified, 22000
        let foreign = token_under(OTHER_KEY, "sk-foreign");
        assert_eq!(state(&foreign), "unverified");
        assert_eq!(
            sqlstate(&format!("SELECT decrypt_token('{foreign}')")),
            "22000"
        );
        // the key list and the displays
        let prev_fp =
            keys::fingerprint(&keys::parse_key(PREV_KEY, keys::KeySource::Environment).unwrap());
        assert_eq!(
            one::<String>("SELECT string_agg(key || ' ' || fingerprint, ', ') FROM provider_keys_encrypt_keys()"),
            Some(format!(
                "current {}, previous 1 {prev_fp}",
                one::<String>("SELECT provider_keys_encrypt_fingerprint()").unwrap()
            ))
        );
        assert_eq!(
            one::<String>("SHOW provider_keys_encrypt.previous_keys"),
            Some(format!(
                "from ENCRYPTION_KEY_PREVIOUS, fingerprints {prev_fp}"
            ))
        );
    }

    #[pg_test]
    fn the_gateway_keyring_comes_from_the_environment() {
        use provider_keys_encrypt_core::format::llmgw::Keyring;
        let expected: Vec<String> = Keyring::parse(GATEWAY_SECRETS)
            .unwrap()
            .entries()
            .iter()
            .map(|s| s.kid().to_string())
            .collect();
        let got: Vec<String> = crate::keyring::with_keyring(|ring: &Keyring| {
            ring.entries().iter().map(|s| s.kid().to_string()).collect()
        })
        .unwrap();
        assert_eq!(got, expected);
        assert_eq!(
            one::<String>("SHOW provider_keys_encrypt.gateway_api_key_hash_secret"),
            Some(format!(
                "from GATEWAY_API_KEY_HASH_SECRET, key ids {}",
                expected.join(", ")
            ))
        );
    }

    /// A key PostgreSQL stored before the check hook could refuse it (here planted directly in
    /// the catalogs; tests/integration/key_sources.test.mjs does it the real way, without
    /// preloading) makes every function refuse, naming where, until it is removed.
    #[pg_test]
    fn a_stored_key_is_found_and_named() {
        assert_eq!(crate::settings::check_setup(), Ok(()));
        Spi::run("SET LOCAL allow_system_table_mods = on").unwrap();
        Spi::run("CREATE FUNCTION pg_temp.leaky(int) RETURNS int LANGUAGE sql AS 'SELECT 1'")
            .unwrap();
        Spi::run(&format!(
            "UPDATE pg_proc SET proconfig = '{{search_path=public,Provider_Keys_Encrypt.Encryption_Key={OTHER_KEY}}}'
              WHERE oid = 'pg_temp.leaky(int)'::regprocedure"
        ))
        .unwrap();
        let e = crate::settings::check_setup().unwrap_err();
        assert_eq!(
            e.sqlstate(),
            PgSqlErrorCode::ERRCODE_CANT_CHANGE_RUNTIME_PARAM
        );
        let text = format!("{e} {}", e.hint().unwrap());
        assert!(
            text.contains("SET clause of function pg_temp") && text.contains("leaky(integer)"),
            "{text}"
        );
        assert!(
            text.contains("RESET provider_keys_encrypt.encryption_key"),
            "{text}"
        );
        assert!(!text.contains(OTHER_KEY));
        Spi::run(
            "UPDATE pg_proc SET proconfig = NULL WHERE oid = 'pg_temp.leaky(int)'::regprocedure",
        )
        .unwrap();
        assert_eq!(crate::settings::check_setup(), Ok(()));

        Spi::run(
            "INSERT INTO pg_db_role_setting VALUES
               ((SELECT oid FROM pg_database WHERE datname = current_database()), 0,
                '{provider_keys_encrypt.gateway_api_key_hash_secret=gw-secret}')",
        )
        .unwrap();
        let e = crate::settings::check_setup().unwrap_err();
        let text = format!("{e} {}", e.hint().unwrap());
        assert!(
            text.contains("pg_db_role_setting") && text.contains("ALTER DATABASE"),
            "{text}"
        );
        assert!(
            text.contains("RESET provider_keys_encrypt.gateway_api_key_hash_secret"),
            "{text}"
        );
        assert!(!text.contains("gw-secret"));
    }

    /// The guard's WARNING describes an unverified base64 value in the engine's words: every
    /// base64 mode's unverified_text (one source in SQL) is core's UNVERIFIED_BASE64.
    #[pg_test]
    fn the_guard_words_unverified_as_the_engine_does() {
        for mode in ["encrypt", "decrypt", "reencrypt"] {
            for encrypt_unverified in [true, false] {
                let text = one::<String>(&format!(
                    "SELECT (pke_internal.mode('{mode}', 'base64', {encrypt_unverified}, NULL, false)).unverified_text"
                ));
                assert_eq!(
                    text.as_deref(),
                    Some(provider_keys_encrypt_core::guard::UNVERIFIED_BASE64),
                    "{mode}"
                );
            }
        }
    }

    /// A table shaped like the gateway's, with the guard on it (`when`: the trigger's timing and
    /// events, `args`: its arguments).
    fn guarded_table(name: &str, when: &str, args: &str) {
        Spi::run(&format!(
            "DROP TABLE IF EXISTS {name};
             CREATE TABLE {name} (id text PRIMARY KEY, token text, provider text NOT NULL, status text);
             CREATE TRIGGER guard {when} ON {name} FOR EACH ROW
                 EXECUTE FUNCTION provider_keys_encrypt_guard({args})"
        ))
        .unwrap();
    }

    /// Each way the guard can fail, with its own SQLSTATE (never XX000).
    #[pg_test]
    fn guard_failures_have_their_own_sqlstate() {
        // guards that cannot work are refused at CREATE TRIGGER by the extension's event trigger
        // (guard_partitions.sql); here they are made anyway, as before 0.2.1, to test what the
        // trigger itself raises (the test's transaction is rolled back)
        Spi::run("ALTER EVENT TRIGGER provider_keys_encrypt_guard_check DISABLE").unwrap();
        let insert = "INSERT INTO g_t VALUES ('a', 'sk-guard-sqlstate', 'openai', NULL)";
        let hex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for (when, args, sql, state) in [
            (
                "BEFORE INSERT OR UPDATE",
                "'mode=reject'",
                insert.to_owned(),
                "23000",
            ),
            (
                "BEFORE INSERT OR UPDATE",
                "'mode=reject'",
                format!("INSERT INTO g_t VALUES ('a', '{hex}', 'openai', NULL)"),
                "23000",
            ),
            (
                "BEFORE INSERT OR UPDATE",
                "'mode=reject', 'unverified=keep'",
                format!("INSERT INTO g_t VALUES ('a', '{hex}', 'openai', NULL)"),
                "00000",
            ),
            (
                "BEFORE INSERT OR UPDATE",
                "'mode=reject'",
                "INSERT INTO g_t VALUES ('a', 'sk-deleted', 'openai', 'deleted')".to_owned(),
                "00000",
            ),
            (
                "BEFORE INSERT OR UPDATE",
                "'mode=reject'",
                "INSERT INTO g_t VALUES ('a', encrypt_token('sk'), 'openai', NULL)".to_owned(),
                "00000",
            ),
            (
                "BEFORE INSERT OR UPDATE",
                "'mode=reject'",
                "INSERT INTO g_t VALUES ('a', NULL, 'openai', NULL)".to_owned(),
                "00000",
            ),
            (
                "BEFORE INSERT OR UPDATE",
                "'mode=nope'",
                insert.to_owned(),
                "22023",
            ),
            (
                "BEFORE INSERT OR UPDATE",
                "'unverified=keep', 'unverified=keep'",
                insert.to_owned(),
                "22023",
            ),
            (
                "BEFORE INSERT OR UPDATE",
                "'format=llmgw2'",
                insert.to_owned(),
                "22023",
            ),
            // llmgw on a base64 table: the llmgw columns are missing
            (
                "BEFORE INSERT OR UPDATE",
                "'format=llmgw'",
                insert.to_owned(),
                "42703",
            ),
            ("AFTER INSERT", "", insert.to_owned(), "39P01"),
            (
                "BEFORE INSERT",
                "",
                "INSERT INTO g_t VALUES ('a', repeat('x', 70000), 'openai', NULL)".to_owned(),
                "54000",
            ),
        ] {
            guarded_table("g_t", when, args);
            assert_eq!(sqlstate(&sql), state, "{when} ({args}): {sql}");
        }
        // fired by a DELETE
        guarded_table("g_t", "BEFORE DELETE", "");
        Spi::run(insert).unwrap();
        assert_eq!(sqlstate("DELETE FROM g_t"), "39P01");
        // a statement-level trigger
        Spi::run(
            "DROP TABLE g_t; CREATE TABLE g_t (id text PRIMARY KEY, token text, provider text, status text);
             CREATE TRIGGER guard BEFORE INSERT ON g_t FOR EACH STATEMENT EXECUTE FUNCTION provider_keys_encrypt_guard()",
        )
        .unwrap();
        assert_eq!(sqlstate(insert), "39P01");
        // the table's shape
        for (ddl, state) in [
            ("CREATE TABLE g_s (id text, token text, provider text)", "42703"),
            ("CREATE TABLE g_s (id integer, token text, provider text, status text)", "42804"),
            ("CREATE TABLE g_s (id text, token bytea, provider text, status text)", "42804"),
            ("CREATE TABLE g_s (id text, token varchar(40), provider text, status text)", "22001"),
            ("CREATE TABLE g_s (id varchar, token varchar(200), provider varchar, status varchar)", "00000"),
        ] {
            Spi::run(&format!(
                "DROP TABLE IF EXISTS g_s; {ddl};
                 CREATE TRIGGER guard BEFORE INSERT ON g_s FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard()"
            ))
            .unwrap();
            let values = if ddl.contains("status") { "('1', 'sk-shape', 'p', NULL)" } else { "('1', 'sk-shape', 'p')" };
            assert_eq!(sqlstate(&format!("INSERT INTO g_s VALUES {values}")), state, "{ddl}");
        }
    }

    /// The engine's own writes: a token this backend has just sealed is passed without being
    /// opened again, but only while the key it was sealed under is still the current key.
    #[pg_test]
    fn the_guard_does_not_open_again_what_this_backend_just_sealed() {
        use crate::guard::counts;
        guarded_table("g_f", "BEFORE INSERT OR UPDATE OF id, token, status", "");
        let delta = |sql: &str| {
            let (fast0, full0) = counts();
            Spi::run(sql).unwrap();
            let (fast1, full1) = counts();
            (fast1 - fast0, full1 - full0)
        };
        // plaintext from the application: classified, then sealed
        assert_eq!(
            delta("INSERT INTO g_f SELECT 'r' || g, 'sk-fast-' || g, 'openai', NULL FROM generate_series(1, 100) g"),
            (0, 100)
        );
        // what the engine writes: UPDATE ... SET token = encrypt_token(...)
        assert_eq!(
            delta("UPDATE g_f SET token = encrypt_token(decrypt_token(token))"),
            (100, 0)
        );
        // the same tokens written again, not just sealed: opened in full
        Spi::run("SELECT encrypt_token('something else sealed last')").unwrap();
        assert_eq!(delta("UPDATE g_f SET token = token || ''"), (0, 100));
        // rotation: tokens under the previous key are opened (and pass); what reencrypt writes
        // is not opened again
        let old = token_under(PREV_KEY, "sk-rotate-through-the-guard");
        assert_eq!(delta(&format!("UPDATE g_f SET token = '{old}'")), (0, 100));
        assert_eq!(
            delta("UPDATE g_f SET token = pke_internal.reencrypt(token)"),
            (100, 0)
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM g_f WHERE pke_internal.token_state(token) = 'current_key'"
            ),
            Some(100)
        );
        // the record counts only for the key that is current: a token noted as sealed under
        // another key is opened in full, and what it is then decides (mode=reject refuses a
        // token under no configured key)
        let other = Base64Ring::build(Some(OTHER_KEY), None).unwrap();
        let token = other.seal_bytes(b"sk-sealed-under-another-key").unwrap();
        crate::format::base64::note_sealed(&other, &token);
        guarded_table(
            "g_r",
            "BEFORE INSERT OR UPDATE OF id, token, status",
            "'mode=reject'",
        );
        let (fast0, full0) = counts();
        assert_eq!(
            sqlstate(&format!(
                "INSERT INTO g_r VALUES ('k', '{token}', 'openai', NULL)"
            )),
            "23000"
        );
        let (fast1, full1) = counts();
        assert_eq!((fast1 - fast0, full1 - full0), (0, 1));
    }

    /// A table in the gateway's llmgw rollout layout (with its XOR check), the guard on it.
    fn llmgw_guarded_table(name: &str, args: &str) {
        Spi::run(&format!(
            "DROP TABLE IF EXISTS {name};
             CREATE TABLE {name} (id text, token text, token_ciphertext text, token_hash text,
                                  token_masked text, organization_id text, provider text NOT NULL,
                                  status text NOT NULL DEFAULT 'active',
                                  CHECK ((token IS NULL) <> (token_ciphertext IS NULL)));
             CREATE TRIGGER guard BEFORE INSERT OR UPDATE OF id, token ON {name} FOR EACH ROW
                 EXECUTE FUNCTION provider_keys_encrypt_guard('format=llmgw'{args})"
        ))
        .unwrap();
    }

    /// Rows of `table` whose key is exactly `plaintext`, the way the backfill writes it: token
    /// NULL, token_ciphertext opening for the row's own id and organization, hash and mask.
    fn llmgw_sealed(table: &str, id: &str, plaintext: &str) -> bool {
        Spi::get_one_with_args::<bool>(
            &format!(
                "SELECT token IS NULL
                        AND token_ciphertext LIKE 'llmgw:v2:%'
                        AND llmgw_decrypt_token(token_ciphertext, id, organization_id) = $2
                        AND token_hash = llmgw_token_hash($2)
                        AND token_masked = llmgw_mask_token($2)
                   FROM {table} WHERE id = $1"
            ),
            &[id.into(), plaintext.into()],
        )
        .unwrap()
            == Some(true)
    }

    /// format=llmgw: a plaintext token written by an old gateway (INSERT or UPDATE) is moved
    /// into token_ciphertext, token_hash and token_masked for its own row; token NULL passes.
    #[pg_test]
    fn the_llmgw_guard_moves_a_plaintext_token() {
        llmgw_guarded_table("gl", "");
        Spi::run(
            "INSERT INTO gl (id, token, organization_id, provider, status) VALUES
                 ('a', 'sk-llmgw-guard-a-12345678', 'org1', 'openai', 'active'),
                 ('b', 'sk-llmgw-guard-b-12345678', NULL, 'anthropic', 'active'),
                 ('c', 'sk-llmgw-guard-c-deleted', 'org1', 'groq', 'deleted')",
        )
        .unwrap();
        assert!(llmgw_sealed("gl", "a", "sk-llmgw-guard-a-12345678"));
        // NULL organization: the managed scope, as llmgw_encrypt_token(…, NULL) seals
        assert!(llmgw_sealed("gl", "b", "sk-llmgw-guard-b-12345678"));
        assert_eq!(
            sqlstate(
                "SELECT llmgw_decrypt_token(token_ciphertext, id, 'org1') FROM gl WHERE id = 'b'"
            ),
            "22000"
        );
        // soft-deleted rows move too (status does not matter for llmgw)
        assert!(llmgw_sealed("gl", "c", "sk-llmgw-guard-c-deleted"));
        // an old gateway updating the key: the last plaintext written wins
        Spi::run("UPDATE gl SET token = 'sk-llmgw-guard-a-NEWKEY99' WHERE id = 'a'").unwrap();
        assert!(llmgw_sealed("gl", "a", "sk-llmgw-guard-a-NEWKEY99"));
        // the new code's write (token NULL) passes untouched, as does an UPDATE of other columns
        let ct =
            one::<String>("SELECT llmgw_encrypt_token('sk-new-code-write', 'd', 'org2')").unwrap();
        Spi::run(&format!(
            "INSERT INTO gl (id, token, token_ciphertext, token_hash, token_masked, organization_id, provider)
             VALUES ('d', NULL, '{ct}', 'hash-as-given', 'mask-as-given', 'org2', 'openai');
             UPDATE gl SET token = NULL WHERE id = 'd';
             UPDATE gl SET status = 'deleted' WHERE id = 'd'"
        ))
        .unwrap();
        assert_eq!(
            one::<String>("SELECT token_ciphertext || '|' || token_hash || '|' || token_masked FROM gl WHERE id = 'd'"),
            Some(format!("{ct}|hash-as-given|mask-as-given"))
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM gl WHERE token IS NOT NULL"),
            Some(0)
        );
        // the status function: format llmgw, its default unverified=keep, fires on token
        assert_eq!(
            one::<String>(
                "SELECT format || ' ' || unverified || ' ' || mode || ' ' || covers_writes
                   FROM provider_keys_guard_status('gl')"
            ),
            Some("llmgw keep encrypt true".into())
        );
        // a guard of format llmgw watching status only does not cover the writes
        Spi::run(
            "DROP TRIGGER guard ON gl;
             CREATE TRIGGER guard BEFORE INSERT OR UPDATE OF status ON gl FOR EACH ROW
                 EXECUTE FUNCTION provider_keys_encrypt_guard('format=llmgw')",
        )
        .unwrap();
        assert_eq!(
            one::<bool>("SELECT covers_writes FROM provider_keys_guard_status('gl')"),
            Some(false)
        );
        // arguments it cannot read, with a column list: not covering (false, not NULL); made
        // past the event trigger that refuses them since 0.2.1 (rolled back with the test)
        Spi::run("ALTER EVENT TRIGGER provider_keys_encrypt_guard_check DISABLE").unwrap();
        Spi::run(
            "DROP TRIGGER guard ON gl;
             CREATE TRIGGER guard BEFORE INSERT OR UPDATE OF id, token ON gl FOR EACH ROW
                 EXECUTE FUNCTION provider_keys_encrypt_guard('format=nope')",
        )
        .unwrap();
        assert_eq!(
            one::<bool>(
                "SELECT covers_writes FROM provider_keys_guard_status('gl') WHERE problem IS NOT NULL"
            ),
            Some(false)
        );
    }

    /// format=llmgw: mode=reject, an llmgw token in column token, a NULL id, the table's shape.
    #[pg_test]
    fn the_llmgw_guard_refuses_and_warns() {
        let v2 = one::<String>("SELECT llmgw_encrypt_token('sk-pasted', 'x', 'o')").unwrap();
        // mode=reject: a plaintext is refused (23000); token NULL passes
        llmgw_guarded_table("glr", ", 'mode=reject'");
        assert_eq!(
            sqlstate(
                "INSERT INTO glr (id, token, provider) VALUES ('r1', 'sk-refused-0001', 'openai')"
            ),
            "23000"
        );
        let ct = one::<String>("SELECT llmgw_encrypt_token('sk-ok', 'r2', NULL)").unwrap();
        assert_eq!(
            sqlstate(&format!(
                "INSERT INTO glr (id, token, token_ciphertext, provider) VALUES ('r2', NULL, '{ct}', 'openai')"
            )),
            "00000"
        );
        assert_eq!(
            sqlstate("UPDATE glr SET token = 'sk-refused-0002' WHERE id = 'r2'"),
            "23000"
        );
        // an llmgw token in column token: kept as given (unverified=keep, the llmgw default)...
        llmgw_guarded_table("glu", "");
        Spi::run(&format!(
            "INSERT INTO glu (id, token, organization_id, provider) VALUES ('u1', '{v2}', 'o', 'openai')"
        ))
        .unwrap();
        assert_eq!(
            one::<bool>(&format!(
                "SELECT token = '{v2}' AND token_ciphertext IS NULL FROM glu WHERE id = 'u1'"
            )),
            Some(true)
        );
        // ... and under mode=reject too (kept, with the WARNING)
        assert_eq!(
            sqlstate(&format!(
                "INSERT INTO glr (id, token, provider) VALUES ('u2', '{v2}', 'openai')"
            )),
            "00000"
        );
        // unverified=plaintext: sealed as a plaintext key; with mode=reject: refused
        llmgw_guarded_table("glp", ", 'unverified=plaintext'");
        Spi::run(&format!(
            "INSERT INTO glp (id, token, organization_id, provider) VALUES ('p1', '{v2}', 'o', 'openai')"
        ))
        .unwrap();
        assert!(llmgw_sealed("glp", "p1", &v2));
        llmgw_guarded_table("glq", ", 'unverified=plaintext', 'mode=reject'");
        assert_eq!(
            sqlstate(&format!(
                "INSERT INTO glq (id, token, provider) VALUES ('q1', '{v2}', 'openai')"
            )),
            "23000"
        );
        // a NULL id with a plaintext: the llmgw functions' error, never XX000; token NULL passes
        llmgw_guarded_table("gln", "");
        assert_eq!(
            sqlstate("INSERT INTO gln (id, token, provider) VALUES (NULL, 'sk-no-id', 'openai')"),
            "22004"
        );
        assert_eq!(
            sqlstate("INSERT INTO gln (id, token, token_ciphertext, provider) VALUES (NULL, NULL, 'x', 'openai')"),
            "00000"
        );
        // the table's shape: the columns llmgw needs (status is not one), text or varchar,
        // and varchar(n) limits on what the guard writes
        let cols = "id text, token text, token_ciphertext text, token_hash text, token_masked text, organization_id text, provider text";
        for (ddl, state) in [
            (cols.to_owned(), "00000"),
            (cols.replace(", token_masked text", ""), "42703"),
            (cols.replace(", organization_id text", ""), "42703"),
            (
                cols.replace("organization_id text", "organization_id integer"),
                "42804",
            ),
            (cols.replace("token_hash text", "token_hash bytea"), "42804"),
            (
                cols.replace("token_ciphertext text", "token_ciphertext varchar(40)"),
                "22001",
            ),
            (
                cols.replace("token_masked text", "token_masked varchar(5)"),
                "22001",
            ),
            (
                cols.replace("token_masked text", "token_masked varchar(17)"),
                "00000",
            ),
            (cols.replace(" text", " varchar"), "00000"),
        ] {
            Spi::run(&format!(
                "DROP TABLE IF EXISTS gls; CREATE TABLE gls ({ddl});
                 CREATE TRIGGER guard BEFORE INSERT OR UPDATE OF id, token ON gls FOR EACH ROW
                     EXECUTE FUNCTION provider_keys_encrypt_guard('format=llmgw')"
            ))
            .unwrap();
            assert_eq!(
                sqlstate("INSERT INTO gls (id, token, provider) VALUES ('s1', 'sk-shape-0123456789', 'p')"),
                state,
                "{ddl}"
            );
        }
        assert!(llmgw_sealed("gls", "s1", "sk-shape-0123456789"));
    }

    /// The llmgw row state, case by case (scripts/test gives the server a gateway keyring).
    #[pg_test]
    fn llmgw_row_states() {
        let current = one::<String>("SELECT llmgw_encrypt_token('sk-state', 'r1', 'o1')").unwrap();
        let parts: Vec<&str> = current.split(':').collect();
        let v1 = format!("llmgw:v1:{}:{}:{}", parts[3], parts[4], parts[5]);
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, &'a str);
        let cases: [Case; 10] = [
            (Some("sk-plain"), None, Some("o1"), "plaintext"),
            (Some(""), None, None, "plaintext"),
            (Some("llmgw:v2:pasted"), None, Some("o1"), "unverified"),
            (None, None, Some("o1"), "unverified"),
            (None, Some(&current), Some("o1"), "current_key"),
            // a value in token is the newest write (an old gateway instance, no XOR constraint)
            (Some("sk-both"), Some(&current), Some("o1"), "plaintext"),
            (
                Some("llmgw:v2:pasted"),
                Some(&current),
                Some("o1"),
                "unverified",
            ),
            (None, Some(&v1), Some("o1"), "previous_key"),
            (None, Some(&current), Some("o2"), "unverified"),
            (None, Some("sk-not-a-token"), Some("o1"), "unverified"),
        ];
        for (token, ct, org, expected) in cases {
            let got = Spi::get_one_with_args::<String>(
                "SELECT pke_internal.llmgw_state($1, $2, 'r1', $3)::text",
                &[token.into(), ct.into(), org.into()],
            )
            .unwrap();
            assert_eq!(
                got.as_deref(),
                Some(expected),
                "{token:?} / {ct:?} / {org:?}"
            );
        }
    }

    /// What the guard must write for llmgw (crate::format::llmgw::seal_row) is what the
    /// backfill writes.
    #[pg_test]
    fn llmgw_seal_row_is_the_backfill() {
        use provider_keys_encrypt_core::RowContext;
        let ctx = RowContext {
            id: "r9",
            organization_id: None,
        };
        let (ct, hash, mask) = crate::keyring::with_keyring(|ring| {
            crate::format::llmgw::seal_row(ring, "sk-guard-hook-1234567", &ctx)
        })
        .unwrap()
        .unwrap();
        let same = Spi::get_one_with_args::<bool>(
            "SELECT llmgw_decrypt_token($1, 'r9', NULL) = 'sk-guard-hook-1234567'
                AND $2 = llmgw_token_hash('sk-guard-hook-1234567')
                AND $3 = llmgw_mask_token('sk-guard-hook-1234567')",
            &[
                ct.as_str().into(),
                hash.as_str().into(),
                mask.as_str().into(),
            ],
        )
        .unwrap();
        assert_eq!(same, Some(true));
        assert_eq!(
            sqlstate("SELECT llmgw_encrypt_token('x', NULL, 'o')"),
            "22004"
        );
    }
}
