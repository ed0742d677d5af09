//! provider_keys_encrypt: encrypt LLM-gateway provider API keys in place, inside PostgreSQL,
//! in the gateway's own token format.
//!
//! Where things are:
//! * `core/` (crate `provider_keys_encrypt_core`, pure Rust, no pgrx): the token formats and
//!   the keys, tested with plain `cargo test -p provider_keys_encrypt_core` and fuzzed
//! * `gucs.rs`      — the settings and the cached key ring
//! * `errors.rs`    — one error type, one SQLSTATE per cause
//! * `functions.rs` — the SQL functions (format base64)
//! * `llmgw.rs`     — the SQL functions of the gateway's current format, llmgw, and its
//!   per-row engine internals
//! * `engine.rs` + `engine/*.sql` — the table engine: CALL encrypt_provider_keys() and siblings
//! * `guard.rs`     — the guard trigger, provider_keys_encrypt_guard()
//! * `privileges.sql` — GRANT/REVOKE, each with its reason

use pgrx::prelude::*;

pub mod engine;
pub mod errors;
pub mod functions;
pub mod guard;
pub mod gucs;
pub mod llmgw;

pub use provider_keys_encrypt_core::{format_base64 as token, keys};

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
}

/// The `#[pg_test]`s: what needs Rust internals inside a real PostgreSQL. SQL-visible
/// behaviour is specified by the golden psql sessions in tests/pg_regress.
#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    /// The library must be preloaded (README "Installing"): the test server does it too.
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'provider_keys_encrypt'"]
    }
}
