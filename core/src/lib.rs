//! The pure core of provider_keys_encrypt: token formats and key handling, with no
//! dependency on PostgreSQL, so that `cargo test -p provider_keys_encrypt_core` and the fuzz
//! target exercise them without a database.
//!
//! * `format`        — the two token formats in one shape ([`format::Keyring`], [`format::State`]):
//!   * `format::base64` — the seed guide's: base64(nonce ‖ tag ‖ ciphertext) in `token`, its
//!     keyring from `ENCRYPTION_KEY` (+ `ENCRYPTION_KEY_PREVIOUS`)
//!   * `format::llmgw`  — the gateway's current: `llmgw:v2:<kid>:<iv>:<ct>:<tag>` (and v1),
//!     keyed by `GATEWAY_API_KEY_HASH_SECRET`, bound to its row; `token_hash`, `token_masked`
//! * `keys`          — `ENCRYPTION_KEY` parsing (as Node decodes it), fingerprints
//! * `key_file`      — `<VAR>_FILE`: a key variable's value read from a secret file
//! * `key_command`   — the output of `provider_keys_encrypt.key_command`: the key variables
//! * `guard`         — what the guard trigger decides for a row, without PostgreSQL
//!
//! Nothing here ever formats a key or a plaintext into a message.

pub mod format;
pub mod guard;
pub mod key_command;
pub mod key_file;
pub mod keys;

/// The row a token belongs to. `format::llmgw` binds its tokens to it (associated data);
/// `format::base64` has no binding and ignores it. Neither field is secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowContext<'a> {
    /// The row's `id`.
    pub id: &'a str,
    /// The row's `organization_id`; `None` for NULL (a platform-managed key).
    pub organization_id: Option<&'a str>,
}
