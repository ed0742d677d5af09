//! The two token formats in SQL, one file each, cut the same way: the functions users call,
//! then the per-row internals the engine calls (`src/engine/modes.sql`). Each is a thin layer
//! over its format in core (`provider_keys_encrypt_core::format`), with its keyring from
//! `keyring.rs` and its errors from `errors.rs`.
//!
//! * `base64.rs` — the guide's format: `encrypt_token`, `decrypt_token`, `is_encrypted_token`,
//!   the fingerprints; `pke_internal.token_state`, `.reencrypt`, `.token_key_id`
//! * `llmgw.rs`  — the gateway's current format: `llmgw_encrypt_token`, `llmgw_decrypt_token`,
//!   `llmgw_token_hash`, `llmgw_mask_token`, `llmgw_key_id`; `pke_internal.llmgw_state`,
//!   `.llmgw_reencrypt`, `.llmgw_key_id_of`, `.base64_check_notice`
//!
//! Labels. Every function that reads a keyring is STABLE (it depends on the server's keys);
//! sealing is VOLATILE (a fresh random nonce every call); only `llmgw_mask_token` is
//! IMMUTABLE. All are PARALLEL SAFE: workers build the same keyrings from the same server
//! environment. Privileges are set in `src/privileges.sql`.

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::prelude::*;
use zeroize::Zeroizing;

pub mod base64;
pub mod llmgw;

/// Decrypted text handed to PostgreSQL as a `text` datum. PostgreSQL gets its own copy; the
/// Rust buffer is wiped when this is dropped.
pub struct SecretText(Zeroizing<String>);

impl SecretText {
    pub fn new(text: Zeroizing<String>) -> SecretText {
        SecretText(text)
    }
}

pgrx::impl_sql_translatable!(SecretText, "text");

// SAFETY: returns a valid text datum built by pgrx's own &str conversion.
unsafe impl BoxRet for SecretText {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.0.as_str().into_datum() {
            // SAFETY: a text datum for a function declared to return text.
            Some(d) => unsafe { fcinfo.return_raw_datum(d) },
            None => fcinfo.return_null(),
        }
    }
}
