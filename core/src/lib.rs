//! The pure core of provider_keys_encrypt: token formats and key handling, with no
//! dependency on PostgreSQL, so that `cargo test -p provider_keys_encrypt_core` and the fuzz
//! target exercise them without a database.
//!
//! * `format_base64` — the seed guide's format: base64(nonce ‖ tag ‖ ciphertext) in `token`
//! * `keys`          — `ENCRYPTION_KEY` parsing, the key ring, fingerprints
//!
//! Nothing here ever formats a key or a plaintext into a message.

pub mod format_base64;
pub mod keys;
