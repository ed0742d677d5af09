//! provider_keys_encrypt: encrypt LLM-gateway provider API keys in place, inside PostgreSQL,
//! in the gateway's own token format.
//!
//! Where things are:
//! * `core/` (crate `provider_keys_encrypt_core`, pure Rust, no pgrx): the token formats in
//!   one shape, the keys, the guard's decisions; tested with plain `cargo test -p
//!   provider_keys_encrypt_core` and fuzzed
//! * `settings.rs`  — where keys come from, the read-only settings that show them, the setup
//!   check
//! * `keyring.rs`   — one per-backend cache for both formats' keyrings
//! * `key_command/` — provider_keys_encrypt.key_command: its answer in shared memory, one run
//!   per reload (`mod.rs`), running the command (`run.rs`); its output's format: core's key_command
//! * `errors.rs`    — one error type, one SQLSTATE per cause
//! * `log_filter.rs` — keeps statements that may hold a key out of the server log
//! * `states.rs`    — the token states as the SQL enum `pke_internal.token_state`
//! * `format/base64.rs`, `format/llmgw.rs` — each format's SQL functions and the per-row
//!   internals the engine calls
//! * `engine.rs` + `engine/*.sql` — the table engine: CALL encrypt_provider_keys() and siblings
//! * `guard.rs`     — the guard trigger, provider_keys_encrypt_guard(): the tuple handling
//! * `privileges.sql` — GRANT/REVOKE, each with its reason
//!
//! Imports go one way: errors → log_filter; key_command → errors; settings → key_command,
//! errors, log_filter; keyring → settings, key_command, errors; format → keyring, errors, states; guard → format, keyring, errors,
//! log_filter; engine → format, keyring, errors. No cycle.

use pgrx::prelude::*;

pub mod engine;
pub mod errors;
pub mod format;
pub mod guard;
pub mod key_command;
pub mod keyring;
pub mod log_filter;
pub mod settings;
pub mod states;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::init();
}

/// The `#[pg_test]`s: what needs Rust internals inside a real PostgreSQL. SQL-visible
/// behaviour is specified by the golden psql sessions in tests/pg_regress.
#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    /// The library must be preloaded (docs/install.md): the test server does it too.
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'provider_keys_encrypt'"]
    }
}
