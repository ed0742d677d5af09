//! `#[pg_test]`s: the SQL surface inside a real PostgreSQL. The test server gets
//! `ENCRYPTION_KEY` from its environment (scripts/test sets TEST_KEY below), like production.
//! Each test runs in a transaction that is rolled back, so `SET` changes stay local to it.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// The key scripts/test gives the test server (never used outside tests).
    const TEST_KEY: &str = "dGVzdC1rZXktcHJvdmlkZXJfa2V5c19lbmNyeXB0LTE=";
    /// Another valid key, for rotation.
    const OTHER_KEY: &str = "b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=";

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
    fn the_test_server_has_the_test_key() {
        assert_eq!(std::env::var("ENCRYPTION_KEY").as_deref(), Ok(TEST_KEY));
        assert_eq!(
            one::<String>("SELECT current_setting('provider_keys_encrypt.encryption_key')")
                .unwrap(),
            format!(
                "from ENCRYPTION_KEY, fingerprint {}",
                one::<String>("SELECT provider_keys_encrypt_fingerprint()").unwrap()
            )
        );
    }

    #[pg_test]
    fn round_trip_of_many_shapes() {
        for plain in [
            "",
            "sk-proj-abc",
            "ключ-🔑",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            &"x".repeat(10_000),
        ] {
            let token = crate::functions::encrypt_token(plain);
            assert!(crate::functions::is_encrypted_token(&token, true));
            assert!(crate::functions::is_encrypted_token(&token, false));
            let back =
                Spi::get_one_with_args::<String>("SELECT decrypt_token($1)", &[token.into()])
                    .unwrap()
                    .unwrap();
            assert_eq!(back, plain);
        }
    }

    #[pg_test]
    fn encryption_is_randomised() {
        assert_eq!(
            one::<i64>(
                "SELECT count(DISTINCT encrypt_token('same')) FROM generate_series(1, 1000)"
            ),
            Some(1000)
        );
    }

    #[pg_test]
    fn null_in_null_out() {
        for sql in [
            "SELECT encrypt_token(NULL) IS NULL",
            "SELECT decrypt_token(NULL) IS NULL",
            "SELECT is_encrypted_token(NULL) IS NULL",
            "SELECT is_encrypted_token(NULL, false) IS NULL",
            "SELECT is_encrypted_token('x', NULL) IS NULL",
        ] {
            assert_eq!(one::<bool>(sql), Some(true), "{sql}");
        }
    }

    #[pg_test]
    fn shape_check_versus_verify() {
        // a 64-hex-character plaintext key looks like a token but does not authenticate
        let hex = "'0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'";
        assert_eq!(
            one::<bool>(&format!(
                "SELECT is_encrypted_token({hex}, verify => false)"
            )),
            Some(true)
        );
        assert_eq!(
            one::<bool>(&format!("SELECT is_encrypted_token({hex})")),
            Some(false)
        );
        for odd in [
            "''",
            "'sk-proj-1'",
            "'===='",
            "repeat('A', 1000000)",
            "E'\\t'",
        ] {
            assert_eq!(
                one::<bool>(&format!("SELECT is_encrypted_token({odd})")),
                Some(false),
                "{odd}"
            );
        }
    }

    /// Every failure has its own SQLSTATE, never XX000.
    macro_rules! sqlstate_cases {
        ($($name:ident: $sql:expr => $state:expr;)*) => {$(
            #[pg_test]
            fn $name() {
                assert_eq!(sqlstate($sql), $state, "{}", $sql);
            }
        )*};
    }

    sqlstate_cases! {
        not_base64_is_22p02: "SELECT decrypt_token('sk-proj-plain')" => "22P02";
        too_short_is_22p02: "SELECT decrypt_token(encode('short', 'base64'))" => "22P02";
        wrong_key_is_22000: "SELECT decrypt_token('0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef')" => "22000";
        bad_key_setting_is_22023: "SET provider_keys_encrypt.encryption_key = 'not-a-key'" => "22023";
        short_key_setting_is_22023: "SET provider_keys_encrypt.encryption_key = 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=='" => "22023";
        bad_previous_key_is_22023: "SET provider_keys_encrypt.previous_keys = 'dGVzdC1rZXktcHJvdmlkZXJfa2V5c19lbmNyeXB0LTE=,nope'" => "22023";
        catalog_storage_is_refused: "ALTER ROLE CURRENT_USER SET provider_keys_encrypt.encryption_key = 'dGVzdC1rZXktcHJvdmlkZXJfa2V5c19lbmNyeXB0LTE='" => "55P02";
        function_set_clause_is_refused: "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql SET provider_keys_encrypt.encryption_key = 'dGVzdC1rZXktcHJvdmlkZXJfa2V5c19lbmNyeXB0LTE=' AS 'SELECT 1'" => "55P02";
        good_key_setting_is_accepted: "SET LOCAL provider_keys_encrypt.encryption_key = 'b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0='" => "00000";
        reserved_prefix: "SET provider_keys_encrypt.no_such_setting = 1" => "42602";
    }

    #[pg_test]
    fn non_utf8_plaintext_is_22021() {
        // a token whose plaintext is the byte 0xFF, made with the test key by the pure code
        let ring = crate::keys::KeyRing::from_config(Some(TEST_KEY), None, None).unwrap();
        let token = ring.encrypt(b"\xff").unwrap();
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
    fn error_messages_never_carry_the_key_or_value() {
        let secret = "sk-proj-DO-NOT-ECHO-1234567890";
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.message_of(q text) RETURNS text LANGUAGE plpgsql AS $$
             DECLARE m text; d text; h text;
             BEGIN EXECUTE q; RETURN '';
             EXCEPTION WHEN OTHERS THEN
               GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT;
               RETURN concat_ws(' | ', m, d, h); END $$",
        )
        .unwrap();
        for (sql, needle) in [
            (format!("SELECT decrypt_token('{secret}')"), secret),
            (
                format!("SET provider_keys_encrypt.encryption_key = '{secret}'"),
                secret,
            ),
            (
                format!("SET provider_keys_encrypt.previous_keys = '{secret}'"),
                secret,
            ),
            (
                format!(
                    "SET provider_keys_encrypt.encryption_key = '{}'",
                    &TEST_KEY[..40]
                ),
                &TEST_KEY[..40],
            ),
        ] {
            let msg = Spi::get_one_with_args::<String>(
                "SELECT pg_temp.message_of($1)",
                &[sql.clone().into()],
            )
            .unwrap()
            .unwrap();
            assert!(!msg.is_empty(), "{sql} should fail");
            assert!(!msg.contains(needle), "{msg}");
        }
    }

    #[pg_test]
    fn missing_key_is_55000_with_hint() {
        // The environment has a key; an explicitly blank setting falls back to it, so emulate
        // "no key at all" through the pure code path the SQL layer uses.
        assert_eq!(
            crate::keys::KeyRing::from_config(None, None, None).err(),
            Some(crate::keys::KeyError::Missing)
        );
        let e = crate::errors::Error::from(crate::keys::KeyError::Missing);
        assert_eq!(
            e.sqlstate(),
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
        );
        let msg = e.to_string();
        assert!(
            msg.contains("provider_keys_encrypt.encryption_key") && msg.contains("ENCRYPTION_KEY")
        );
        assert!(e.hint().unwrap().contains("openssl rand -base64 32"));
    }

    #[pg_test]
    fn rotation_with_previous_keys() {
        let old_token = one::<String>("SELECT encrypt_token('sk-rotate')").unwrap();
        // switch to a new current key; the old one is unknown until listed as previous
        Spi::run(&format!(
            "SET LOCAL provider_keys_encrypt.encryption_key = '{OTHER_KEY}'"
        ))
        .unwrap();
        assert_eq!(
            sqlstate(&format!("SELECT decrypt_token('{old_token}')")),
            "22000"
        );
        assert_eq!(state(&old_token), "unverified");
        Spi::run(&format!(
            "SET LOCAL provider_keys_encrypt.previous_keys = '{TEST_KEY}'"
        ))
        .unwrap();
        assert_eq!(state(&old_token), "previous_key");
        assert_eq!(
            one::<String>(&format!("SELECT decrypt_token('{old_token}')")).as_deref(),
            Some("sk-rotate")
        );
        let new_token =
            one::<String>(&format!("SELECT pke_internal.reencrypt('{old_token}')")).unwrap();
        assert_eq!(state(&new_token), "current_key");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM provider_keys_encrypt_keys()"),
            Some(2)
        );
        assert!(one::<String>("SHOW provider_keys_encrypt.previous_keys")
            .unwrap()
            .starts_with("fingerprints "));
    }

    #[pg_test]
    fn settings_are_hidden_from_pg_settings_and_show_all() {
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pg_settings WHERE name LIKE 'provider_keys_encrypt.%'"
            ),
            Some(0)
        );
        Spi::run(&format!(
            "SET LOCAL provider_keys_encrypt.encryption_key = '{OTHER_KEY}'"
        ))
        .unwrap();
        let shown = one::<String>("SHOW provider_keys_encrypt.encryption_key").unwrap();
        assert!(shown.starts_with("set, fingerprint "), "{shown}");
        assert!(!shown.contains(OTHER_KEY));
    }

    #[pg_test]
    fn labels_are_honest() {
        // volatility, strictness and parallel safety as documented in functions.rs
        let rows: Vec<(String, String, bool, String)> = Spi::connect(|c| {
            c.select(
                "SELECT proname::text, provolatile::text, proisstrict, proparallel::text
                   FROM pg_proc WHERE proname IN ('encrypt_token','decrypt_token','is_encrypted_token',
                         'provider_keys_encrypt_fingerprint','token_state','may_commit','reencrypt')
                  ORDER BY 1",
                None,
                &[],
            )
            .unwrap()
            .map(|r| {
                (
                    r.get::<String>(1).unwrap().unwrap(),
                    r.get::<String>(2).unwrap().unwrap(),
                    r.get::<bool>(3).unwrap().unwrap(),
                    r.get::<String>(4).unwrap().unwrap(),
                )
            })
            .collect()
        });
        let expect = [
            ("decrypt_token", "s", true, "s"),
            ("encrypt_token", "v", true, "s"),
            ("is_encrypted_token", "s", true, "s"),
            ("may_commit", "v", false, "u"),
            ("provider_keys_encrypt_fingerprint", "s", true, "s"),
            ("reencrypt", "v", true, "s"),
            ("token_state", "s", true, "s"),
        ];
        assert_eq!(rows.len(), expect.len());
        for (row, e) in rows.iter().zip(expect) {
            assert_eq!((row.0.as_str(), row.1.as_str(), row.2, row.3.as_str()), e);
        }
        assert_eq!(
            one::<bool>(
                "SELECT has_function_privilege('public', 'decrypt_token(text)', 'EXECUTE')"
            ),
            Some(false)
        );
        assert_eq!(
            one::<bool>(
                "SELECT has_function_privilege('public', 'encrypt_token(text)', 'EXECUTE')"
            ),
            Some(true)
        );
    }

    /// The llmgw row state, case by case (scripts/test gives the server a gateway keyring).
    #[pg_test]
    fn llmgw_row_states() {
        let current = one::<String>("SELECT llmgw_encrypt_token('sk-state', 'r1', 'o1')").unwrap();
        let parts: Vec<&str> = current.split(':').collect();
        let v1 = format!("llmgw:v1:{}:{}:{}", parts[3], parts[4], parts[5]);
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, &'a str);
        let cases: [Case; 9] = [
            (Some("sk-plain"), None, Some("o1"), "plaintext"),
            (Some(""), None, None, "plaintext"),
            (Some("llmgw:v2:pasted"), None, Some("o1"), "unverified"),
            (None, None, Some("o1"), "unverified"),
            (None, Some(&current), Some("o1"), "current_key"),
            (Some("sk-both"), Some(&current), Some("o1"), "current_key"),
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

    /// What the guard must write for llmgw (crate::llmgw::seal_row) is what the backfill writes.
    #[pg_test]
    fn llmgw_seal_row_is_the_backfill() {
        use provider_keys_encrypt_core::RowContext;
        let ctx = RowContext {
            id: "r9",
            organization_id: None,
        };
        let (ct, hash, mask) = crate::gucs::with_gateway_keyring(|ring| {
            crate::llmgw::seal_row(ring, "sk-guard-hook-1234567", &ctx)
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
