//! The guide's format, `base64`, in SQL: base64(nonce ‖ tag ‖ ciphertext) in `token`, keyring
//! `ENCRYPTION_KEY` (+ `ENCRYPTION_KEY_PREVIOUS`). Thin wrappers over
//! `provider_keys_encrypt_core::format::base64` (the format itself, its unit tests and its
//! Node vectors live there).
//!
//! Labels: every function is STRICT (NULL in, NULL out) and PARALLEL SAFE; `encrypt_token`
//! and `pke_internal.reencrypt` are VOLATILE (fresh random nonce); everything else reads the
//! keys and is STABLE.
//!
//! The engine's own writes: `UPDATE ... SET token = encrypt_token(t.token)` fires the guard on
//! the token this backend has just sealed. [`note_sealed`] keeps the last token sealed in this
//! backend and the fingerprint of the key it was sealed under; a token equal to it byte for
//! byte, while that key is still the current key, is known to authenticate under the current
//! key, and the guard passes it without opening it again ([`sealed_just_now`]).

use std::cell::RefCell;

use pgrx::prelude::*;
use provider_keys_encrypt_core::format::base64::{self as token, Base64Error, Keyring};
use provider_keys_encrypt_core::format::Keyring as _;

use super::SecretText;
use crate::errors::OrRaise;
use crate::keyring::with_keyring;

/// Run `f` with the base64 keyring.
fn with_ring<T>(f: impl FnOnce(&Keyring) -> T) -> T {
    with_keyring(f).or_raise()
}

// ---------------------------------------------------------------------------------------------
// The SQL functions

/// Encrypt a plaintext API key under the current key. The result is a token in the gateway's
/// format: base64(nonce ‖ tag ‖ ciphertext), with a fresh random nonce every call.
#[pg_extern(volatile, strict, parallel_safe)]
pub fn encrypt_token(plaintext: &str) -> String {
    with_ring(|ring| {
        let token = ring.seal(plaintext, ())?;
        // the guard, if the token is written next, need not open it again
        note_sealed(ring, &token);
        Ok::<_, Base64Error>(token)
    })
    .or_raise()
}

/// Decrypt a token written by this extension or by the gateway, under the current key or any
/// previous key.
#[pg_extern(stable, strict, parallel_safe)]
pub fn decrypt_token(token: &str) -> SecretText {
    SecretText::new(with_ring(|ring| ring.open(token, ())).or_raise())
}

/// True when `token` is a well-formed token that authenticates under a configured key (the
/// only reliable test). With `verify => false`: the key-less shape test (canonical standard
/// base64 of at least 28 bytes), which many plaintext API keys also pass.
#[pg_extern(stable, strict, parallel_safe)]
pub fn is_encrypted_token(token: &str, verify: default!(bool, true)) -> bool {
    if !verify {
        return token::is_token_shaped(token);
    }
    with_ring(|ring| ring.classify(token, ()))
        .or_raise()
        .opens()
}

/// A short, non-secret fingerprint of the current key: the first 16 hex digits of
/// HMAC-SHA-256(key, 'provider_keys_encrypt key fingerprint v1'). Compare it with the
/// gateway's (docs/configuration.md shows the Node one-liner) to confirm both hold the same key.
#[pg_extern(stable, strict, parallel_safe)]
pub fn provider_keys_encrypt_fingerprint() -> String {
    with_ring(|ring| ring.current().fingerprint().to_owned())
}

/// Every configured key, in the order decryption tries them: which it is and its fingerprint.
#[pg_extern(stable, strict, parallel_safe)]
pub fn provider_keys_encrypt_keys(
) -> TableIterator<'static, (name!(key, String), name!(fingerprint, String))> {
    let rows = with_ring(|ring| {
        let mut rows = vec![(
            "current".to_owned(),
            ring.current().fingerprint().to_owned(),
        )];
        rows.extend(
            ring.previous()
                .iter()
                .enumerate()
                .map(|(i, k)| (format!("previous {}", i + 1), k.fingerprint().to_owned())),
        );
        rows
    });
    TableIterator::new(rows)
}

// ---------------------------------------------------------------------------------------------
// The engine's per-row internals (format => 'base64')

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
    let state = with_ring(|ring| ring.classify(token, ())).or_raise();
    // SAFETY: pgrx hands us this call's fcinfo.
    unsafe { crate::states::state_oid(fcinfo, state) }
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
    with_ring(|ring| {
        let sealed = ring.reseal(token, ())?;
        note_sealed(ring, &sealed);
        Ok::<_, Base64Error>(sealed)
    })
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
    with_ring(|ring| {
        ring.authenticating_key(token)
            .map(|key| key.map(|k| k.fingerprint().to_owned()))
    })
    .or_raise()
}

// ---------------------------------------------------------------------------------------------
// The last token sealed in this backend (the engine's own writes, see the module doc)

struct LastSealed {
    /// Fingerprint of the key the token was sealed under (the current key at the time).
    fingerprint: String,
    token: String,
}

thread_local! {
    static LAST_SEALED: RefCell<LastSealed> = const {
        RefCell::new(LastSealed { fingerprint: String::new(), token: String::new() })
    };
}

/// Remember `token`, just sealed under `ring`'s current key in this backend: when the guard
/// sees exactly these bytes next, it need not open them again. Called by encrypt_token,
/// pke_internal.reencrypt and the guard itself. Tokens are not secret; the buffers are reused.
pub fn note_sealed(ring: &Keyring, token: &str) {
    LAST_SEALED.with(|cell| {
        let Ok(mut last) = cell.try_borrow_mut() else {
            return;
        };
        last.token.clear();
        last.fingerprint.clear();
        let fingerprint = ring.current().fingerprint();
        // never abort the backend on memory: without room, remember nothing
        if last.token.try_reserve(token.len()).is_ok()
            && last.fingerprint.try_reserve(fingerprint.len()).is_ok()
        {
            last.token.push_str(token);
            last.fingerprint.push_str(fingerprint);
        }
    });
}

/// Is `token` the one this backend sealed last, under what is still the current key?
pub fn sealed_just_now(ring: &Keyring, token: &[u8]) -> bool {
    LAST_SEALED.with(|cell| {
        cell.try_borrow().is_ok_and(|last| {
            !last.token.is_empty()
                && last.token.as_bytes() == token
                && last.fingerprint == ring.current().fingerprint()
        })
    })
}
