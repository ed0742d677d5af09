//! The table engine behind `CALL encrypt_provider_keys()`, `decrypt_provider_keys()`,
//! `reencrypt_provider_keys()` and `provider_keys_encryption_report()`.
//!
//! The transaction control lives in PL/pgSQL (`table.sql`), because a procedure written in
//! PL/pgSQL can COMMIT between batches with PostgreSQL's own, well-trodden machinery; the
//! per-row work (classifying and sealing tokens) is the Rust in `functions.rs`, called from
//! one set-based statement per batch. Read `table.sql` from the top: it explains the batch,
//! why no update is lost, the savepoint strategy and why a run never keeps more than one
//! written subtransaction per transaction.

use pgrx::prelude::*;

use crate::gucs::with_keyring;

/// Remove a row's secrets from an error message before it is reported in a WARNING: the
/// stored value and, when it is a token we can open, its plaintext. (A trigger's message may
/// quote OLD.token or NEW.token.)
#[pg_extern(stable, strict, parallel_safe)]
pub fn _pke_scrub(message: &str, token: &str) -> String {
    const REDACTED: &str = "[redacted]";
    let mut out = message.to_owned();
    if !token.is_empty() {
        out = out.replace(token, REDACTED);
    }
    if let Ok(Ok(plain)) = with_keyring(|ring| ring.decrypt(token)) {
        if !plain.is_empty() {
            out = out.replace(plain.as_str(), REDACTED);
        }
    }
    out
}

/// This backend's subtransaction-XID cache: how many committed subtransactions with an XID
/// the current top-level transaction holds, and whether it overflowed (more than 64), which
/// makes every snapshot on the server "suboverflowed". The tests use it to show that a run
/// stays well below the limit.
#[pg_extern(volatile, parallel_unsafe)]
pub fn _pke_subxact_status() -> TableIterator<'static, (name!(cached, i32), name!(overflowed, bool))>
{
    // SAFETY: MyProc is this backend's own PGPROC, valid for the life of the backend.
    let (count, overflowed) = unsafe {
        let proc_ = pg_sys::MyProc;
        (
            (*proc_).subxidStatus.count as i32,
            (*proc_).subxidStatus.overflowed,
        )
    };
    TableIterator::once((count, overflowed))
}

pgrx::extension_sql_file!(
    "table.sql",
    name = "table_engine",
    requires = [
        functions::encrypt_token,
        functions::decrypt_token,
        functions::provider_keys_encrypt_fingerprint,
        functions::_pke_token_state,
        functions::_pke_reencrypt,
        functions::_pke_may_commit,
        _pke_scrub,
    ]
);

pgrx::extension_sql_file!("privileges.sql", name = "privileges", finalize);

// Tokens carry UTF-8 text, exactly as the gateway's Node code writes it: refuse to install into
// a database whose encoding would turn plaintexts into something else.
pgrx::extension_sql!(
    r#"
DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() <> 'UTF8' THEN
        RAISE EXCEPTION 'provider_keys_encrypt requires a UTF8 database, not %', pg_catalog.getdatabaseencoding()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Tokens hold UTF-8 text, as the gateway writes them. Create the database with ENCODING ''UTF8''.';
    END IF;
END
$$;
"#,
    name = "require_utf8",
    bootstrap
);
