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
//! This file holds the Rust the engine calls per row (classifying, re-sealing) and per run,
//! for the base64 format; the llmgw format's per-row internals are in `llmgw.rs`.
//! Everything in `pke_internal` is an internal: nobody but the extension can create objects
//! there, and every function that does not COMMIT pins `search_path = pg_catalog, pg_temp`.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{function_name, PgLogLevel, PgSqlErrorCode};

use crate::errors::OrRaise;
use crate::gucs::with_keyring;
use crate::keys::TokenState;

/// The labels of `pke_internal.token_state`, in the enum's order. One vocabulary: the engine,
/// the report and the messages use exactly these names, for every format.
pub const TOKEN_STATE_LABELS: [&std::ffi::CStr; 4] =
    [c"plaintext", c"current_key", c"previous_key", c"unverified"];

/// A `pke_internal.token_state` label, by its position in [`TOKEN_STATE_LABELS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateLabel {
    Plaintext = 0,
    CurrentKey = 1,
    PreviousKey = 2,
    Unverified = 3,
}

impl From<TokenState> for StateLabel {
    fn from(state: TokenState) -> StateLabel {
        match state {
            TokenState::Plaintext => StateLabel::Plaintext,
            TokenState::Current => StateLabel::CurrentKey,
            TokenState::Previous => StateLabel::PreviousKey,
            TokenState::Unverified => StateLabel::Unverified,
        }
    }
}

fn label_index(state: TokenState) -> usize {
    StateLabel::from(state) as usize
}

/// The OID of `label` in the calling function's return type (`pke_internal.token_state`).
///
/// # Safety
/// `fcinfo` must be the call's own, valid `FunctionCallInfo`, of a function declared to
/// return `pke_internal.token_state`.
pub(crate) unsafe fn state_oid(fcinfo: pg_sys::FunctionCallInfo, label: StateLabel) -> pg_sys::Oid {
    // SAFETY: guaranteed by the caller.
    unsafe { state_oids(fcinfo)[label as usize] }
}

/// The OIDs of the enum's labels, cached in the calling expression's `fn_extra` (so a
/// re-created extension, with new OIDs, is never served stale ones).
///
/// # Safety
/// `fcinfo` must be the call's own, valid `FunctionCallInfo`.
unsafe fn state_oids(fcinfo: pg_sys::FunctionCallInfo) -> &'static [pg_sys::Oid; 4] {
    // SAFETY: the caller passes its own fcinfo; flinfo and fn_mcxt live as long as the
    // expression that calls this function, and so does what we allocate in fn_mcxt.
    unsafe {
        let flinfo = (*fcinfo).flinfo;
        if (*flinfo).fn_extra.is_null() {
            let typoid = pg_sys::get_func_rettype((*flinfo).fn_oid);
            let mut oids = [pg_sys::InvalidOid; 4];
            for (slot, label) in oids.iter_mut().zip(TOKEN_STATE_LABELS) {
                *slot = pg_sys::GetSysCacheOid(
                    pg_sys::SysCacheIdentifier::ENUMTYPOIDNAME as _,
                    pg_sys::Anum_pg_enum_oid as _,
                    pg_sys::Datum::from(typoid),
                    pg_sys::Datum::from(label.as_ptr()),
                    pg_sys::Datum::from(0),
                    pg_sys::Datum::from(0),
                );
                if *slot == pg_sys::InvalidOid {
                    ErrorReport::new(
                        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                        "pke_internal.token_state lacks a label this library needs",
                        function_name!(),
                    )
                    .set_hint("Run ALTER EXTENSION provider_keys_encrypt UPDATE.")
                    .report(PgLogLevel::ERROR);
                }
            }
            let mem = pg_sys::MemoryContextAlloc((*flinfo).fn_mcxt, size_of::<[pg_sys::Oid; 4]>())
                as *mut [pg_sys::Oid; 4];
            mem.write(oids);
            (*flinfo).fn_extra = mem.cast();
        }
        &*((*flinfo).fn_extra as *const [pg_sys::Oid; 4])
    }
}

/// `pke_internal.token_state(token)`: which configured key, if any, a stored value
/// authenticates under. Never raises on odd input (only when no usable key is configured).
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.token_state(token text) RETURNS pke_internal.token_state
    LANGUAGE c STRICT STABLE PARALLEL SAFE COST 10
    AS 'MODULE_PATHNAME', 'pke_token_state_wrapper';
COMMENT ON FUNCTION pke_internal.token_state(text) IS
    'Engine internal: plaintext, current_key, previous_key or unverified.';
",
    requires = ["engine_types"]
)]
// pgrx hands the wrapper its own, valid fcinfo; the function is not callable from Rust code.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn pke_token_state(token: &str, fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Oid {
    let state = with_keyring(|ring| ring.classify(token))
        .or_raise()
        .or_raise();
    // SAFETY: pgrx hands us this call's fcinfo.
    unsafe { state_oids(fcinfo)[label_index(state)] }
}

/// `pke_internal.reencrypt(token)`: the same plaintext sealed under the current key (key
/// rotation). The plaintext never leaves a zeroizing buffer and is never returned.
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.reencrypt(token text) RETURNS text
    LANGUAGE c STRICT VOLATILE PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'pke_reencrypt_wrapper';
",
    requires = ["engine_types"]
)]
pub fn pke_reencrypt(token: &str) -> String {
    with_keyring(|ring| {
        let sealed = ring.reencrypt(token)?;
        crate::guard::note_sealed(ring, &sealed);
        Ok::<_, crate::token::TokenError>(sealed)
    })
    .or_raise()
    .or_raise()
}

/// `pke_internal.token_key_id(token)`: the fingerprint of the configured key a token
/// authenticates under (NULL: none), for the report. Fingerprints are public.
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.token_key_id(token text) RETURNS text
    LANGUAGE c STRICT STABLE PARALLEL SAFE COST 10
    AS 'MODULE_PATHNAME', 'pke_token_key_id_wrapper';
",
    requires = ["engine_types"]
)]
pub fn pke_token_key_id(token: &str) -> Option<String> {
    with_keyring(|ring| {
        ring.authenticating_key(token)
            .map(|key| key.map(|k| k.fingerprint().to_owned()))
    })
    .or_raise()
    .or_raise()
}

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

    #[pg_extern(sql = false)]
    pub fn _pke_token_state(token: &str) -> i16 {
        label_index(
            with_keyring(|ring| ring.classify(token))
                .or_raise()
                .or_raise(),
        ) as i16
    }

    #[pg_extern(sql = false)]
    pub fn _pke_reencrypt(token: &str) -> String {
        pke_reencrypt(token)
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
        functions::encrypt_token,
        functions::decrypt_token,
        pke_reencrypt,
        pke_token_state,
        pke_token_key_id,
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
        pke_flush_wal,
        functions::provider_keys_encrypt_fingerprint
    ]
);
pgrx::extension_sql_file!(
    "engine/api.sql",
    name = "engine_api",
    requires = ["engine_run"]
);

pgrx::extension_sql_file!("privileges.sql", name = "privileges", finalize);
