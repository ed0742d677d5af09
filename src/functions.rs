//! The SQL functions: thin wrappers over `keys.rs` / `token.rs`.
//!
//! Labels: all are STRICT (NULL in, NULL out) and PARALLEL SAFE (no backend-local state
//! besides the key cache, which parallel workers rebuild from the same server environment).
//! `encrypt_token` is VOLATILE (fresh random nonce); everything that reads the keys is STABLE;
//! nothing is IMMUTABLE because every function depends on the server's keys.
//! Privileges are set in `sql/privileges.sql` (see `lib.rs`).

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::prelude::*;
use zeroize::Zeroizing;

use crate::errors::OrRaise;
use crate::gucs::with_keyring;
use crate::keys::TokenState;
use crate::token;

/// Encrypt a plaintext API key under the current key. The result is a token in the gateway's
/// format: base64(nonce ‖ tag ‖ ciphertext), with a fresh random nonce every call.
#[pg_extern(volatile, strict, parallel_safe)]
pub fn encrypt_token(plaintext: &str) -> String {
    with_keyring(|ring| {
        let token = ring.encrypt(plaintext.as_bytes())?;
        // the guard, if the token is written next, need not open it again
        crate::guard::note_sealed(ring, &token);
        Ok::<_, crate::token::TokenError>(token)
    })
    .or_raise()
    .or_raise()
}

/// Decrypt a token written by this extension or by the gateway, under the current key or any
/// previous key.
#[pg_extern(stable, strict, parallel_safe)]
pub fn decrypt_token(token: &str) -> SecretText {
    SecretText(
        with_keyring(|ring| ring.decrypt(token))
            .or_raise()
            .or_raise(),
    )
}

/// True when `token` is a well-formed token that authenticates under a configured key (the
/// only reliable test). With `verify => false`: the key-less shape test (canonical standard
/// base64 of at least 28 bytes), which many plaintext API keys also pass.
#[pg_extern(stable, strict, parallel_safe)]
pub fn is_encrypted_token(token: &str, verify: default!(bool, true)) -> bool {
    if !verify {
        return token::is_token_shaped(token);
    }
    let state = with_keyring(|ring| ring.classify(token))
        .or_raise()
        .or_raise();
    matches!(state, TokenState::Current | TokenState::Previous)
}

/// A short, non-secret fingerprint of the current key: the first 16 hex digits of
/// HMAC-SHA-256(key, 'provider_keys_encrypt key fingerprint v1'). Compare it with the
/// gateway's (README shows the Node one-liner) to confirm both hold the same key.
#[pg_extern(stable, strict, parallel_safe)]
pub fn provider_keys_encrypt_fingerprint() -> String {
    with_keyring(|ring| ring.current().fingerprint().to_owned()).or_raise()
}

/// Every configured key, in the order decryption tries them: which it is and its fingerprint.
#[pg_extern(stable, strict, parallel_safe)]
pub fn provider_keys_encrypt_keys(
) -> TableIterator<'static, (name!(key, String), name!(fingerprint, String))> {
    let rows = with_keyring(|ring| {
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
    })
    .or_raise();
    TableIterator::new(rows)
}

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
