//! The table engine behind `CALL encrypt_provider_keys()`, `decrypt_provider_keys()`,
//! `reencrypt_provider_keys()` and `provider_keys_encryption_report()`.
//!
//! The engine itself is SQL, in small files under `src/engine/`, one job each; read them in
//! this order:
//!
//! * `types.sql`   — the private schema `pke_internal`, the token states, the run's state
//! * `modes.sql`   — each mode (encrypt / decrypt / re-encrypt) described once
//! * `table.sql`   — which table, and everything checked before a row is read
//! * `guard.sql`   — the guard trigger's status, install and checks (the trigger: guard.rs)
//! * `batch.sql`   — one batch: its statement, the savepoint strategy, failing rows
//! * `run.sql`     — a run: start, steps, a durable finish, the summary
//! * `api.sql`     — the procedures and the report users call
//!
//! This file holds the Rust the engine calls per run (may it commit, flush the WAL, the
//! subtransaction cache) and declares the SQL files in pgrx's order. What it calls per row is
//! each format's (`format/base64.rs`, `format/llmgw.rs`); the token states are `states.rs`.
//! Everything in `pke_internal` is an internal: nobody but the extension can create objects
//! there, and every function that does not COMMIT pins `search_path = pg_catalog, pg_temp`.

use pgrx::prelude::*;

use crate::format::base64;

/// `pke_internal.may_commit()`: may the calling PL/pgSQL procedure COMMIT? True only when it
/// was itself CALLed in a non-atomic context (top level, outside a transaction block).
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.may_commit() RETURNS boolean
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pke_may_commit_wrapper';
",
    requires = ["engine_types"]
)]
pub fn pke_may_commit() -> bool {
    // SAFETY: reads the current SPI stack entry (the calling procedure's); opens nothing.
    unsafe { pg_sys::SPI_inside_nonatomic_context() }
}

/// `pke_internal.flush_wal()`: flush the WAL up to the end of this backend's last commit
/// record. A run commits its batches with `synchronous_commit = off`; this, before it says
/// "completed", makes every one of those commits durable (the run's last, empty transaction
/// writes no WAL of its own, so its commit would not wait for a flush, whatever
/// synchronous_commit says).
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.flush_wal() RETURNS void
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pke_flush_wal_wrapper';
",
    requires = ["engine_types"]
)]
pub fn pke_flush_wal() {
    // SAFETY: reads this backend's end of its last commit record and flushes the WAL up to it,
    // as a synchronous commit would. (The insert position is no valid flush target: at a page
    // boundary it points past a page header that is not written yet.)
    unsafe {
        let last_commit = pg_sys::XactLastCommitEnd;
        if last_commit != 0 && !pg_sys::RecoveryInProgress() {
            pg_sys::XLogFlush(last_commit);
        }
    }
}

/// `pke_internal.keys_reload_pending()`: did a configuration reload arrive during this
/// statement while `provider_keys_encrypt.key_command` gives the keys? A statement (a CALL
/// too) runs under the keys it started with; the run summary says so when this is true.
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.keys_reload_pending() RETURNS boolean
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pke_keys_reload_pending_wrapper';
",
    requires = ["engine_types"]
)]
pub fn pke_keys_reload_pending() -> bool {
    crate::settings::keys_may_change_after_this_statement()
}

/// `pke_internal.wait_for_older_keys()`: `reencrypt_provider_keys` calls it first: it waits
/// until no other session's transaction (or CALL) still uses keys from before this session's,
/// when provider_keys_encrypt.key_command gives the keys (see `key_command.rs`); returns how
/// many sessions it waited for (0 at once otherwise).
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.wait_for_older_keys() RETURNS integer
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pke_wait_for_older_keys_wrapper';
",
    requires = ["engine_types"]
)]
pub fn pke_wait_for_older_keys() -> i32 {
    crate::key_command::wait_for_older_keys().unwrap_or_else(|e| e.raise())
}

/// `pke_internal.subxact_status()`: this backend's subtransaction-XID cache — how many
/// committed subtransactions with an XID the current top-level transaction holds, and
/// whether it overflowed (more than 64), which makes every snapshot on the server
/// "suboverflowed". The tests use it to show that a run stays far below the limit.
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.subxact_status() RETURNS TABLE (cached integer, overflowed boolean)
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pke_subxact_status_wrapper';
",
    requires = ["engine_types"]
)]
pub fn pke_subxact_status() -> TableIterator<'static, (name!(cached, i32), name!(overflowed, bool))>
{
    TableIterator::once(subxact_status())
}

fn subxact_status() -> (i32, bool) {
    // SAFETY: MyProc is this backend's own PGPROC, valid for the life of the backend.
    unsafe {
        let proc_ = pg_sys::MyProc;
        (
            (*proc_).subxidStatus.count as i32,
            (*proc_).subxidStatus.overflowed,
        )
    }
}

/// The C symbols of version 0.1.0's internals. `CREATE EXTENSION provider_keys_encrypt
/// VERSION '0.1.0'` checks that every function it defines exists in this library, and a
/// database still on 0.1.0 calls them until `ALTER EXTENSION ... UPDATE` drops them. They
/// keep 0.1.0's behaviour except `_pke_scrub`, which no longer decrypts (it was a plaintext
/// oracle). No 0.2.0 SQL object uses them.
pub mod compat_0_1_0 {
    use super::*;
    use crate::errors::OrRaise;
    use crate::keyring::with_keyring;
    use provider_keys_encrypt_core::format::{Keyring as _, State};

    /// The state's position in 0.1.0's labels (those of `State::ALL`).
    #[pg_extern(sql = false)]
    pub fn _pke_token_state(token: &str) -> i16 {
        let state = with_keyring(
            |ring: &provider_keys_encrypt_core::format::base64::Keyring| ring.classify(token, ()),
        )
        .or_raise()
        .or_raise();
        State::ALL.iter().position(|s| *s == state).unwrap_or(0) as i16
    }

    #[pg_extern(sql = false)]
    pub fn _pke_reencrypt(token: &str) -> String {
        base64::pke_reencrypt(token)
    }

    #[pg_extern(sql = false)]
    pub fn _pke_may_commit() -> bool {
        pke_may_commit()
    }

    #[pg_extern(sql = false)]
    pub fn _pke_scrub(message: &str, token: &str) -> String {
        if token.is_empty() {
            message.to_owned()
        } else {
            message.replace(token, "[redacted]")
        }
    }

    #[pg_extern(sql = false)]
    pub fn _pke_subxact_status(
    ) -> TableIterator<'static, (name!(cached, i32), name!(overflowed, bool))> {
        TableIterator::once(subxact_status())
    }
}

pgrx::extension_sql_file!("engine/types.sql", name = "engine_types", bootstrap);
pgrx::extension_sql_file!(
    "engine/modes.sql",
    name = "engine_modes",
    requires = [
        "engine_types",
        base64::encrypt_token,
        base64::decrypt_token,
        base64::pke_reencrypt,
        base64::pke_token_state,
        base64::pke_token_key_id,
        llmgw::llmgw_encrypt_token,
        llmgw::llmgw_decrypt_token,
        llmgw::llmgw_token_hash,
        llmgw::llmgw_mask_token,
        llmgw::llmgw_key_id,
        llmgw::llmgw_state,
        llmgw::llmgw_reencrypt,
        llmgw::llmgw_key_id_of
    ]
);
pgrx::extension_sql_file!(
    "engine/table.sql",
    name = "engine_table",
    requires = ["engine_modes"]
);
pgrx::extension_sql_file!(
    "engine/guard.sql",
    name = "engine_guard",
    requires = [
        "engine_table",
        guard::provider_keys_encrypt_guard,
        guard::pke_guard_settings
    ]
);
pgrx::extension_sql_file!(
    "engine/batch.sql",
    name = "engine_batch",
    requires = ["engine_guard"]
);
pgrx::extension_sql_file!(
    "engine/run.sql",
    name = "engine_run",
    requires = [
        "engine_batch",
        pke_may_commit,
        pke_keys_reload_pending,
        pke_wait_for_older_keys,
        pke_flush_wal,
        base64::provider_keys_encrypt_fingerprint
    ]
);
pgrx::extension_sql_file!(
    "engine/api.sql",
    name = "engine_api",
    requires = ["engine_run"]
);

pgrx::extension_sql_file!("privileges.sql", name = "privileges", finalize);
