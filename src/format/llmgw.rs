//! The gateway's current format, `llmgw`, in SQL: thin wrappers over
//! `provider_keys_encrypt_core::format::llmgw` (the format itself, its unit tests and its Node
//! interop test live there), and the per-row internals the engine calls for
//! `format => 'llmgw'` (see `engine/modes.sql`).
//!
//! The keyring is the server's `GATEWAY_API_KEY_HASH_SECRET` (comma-separated secrets, the
//! first one current), built once per backend by `crate::keyring`.
//!
//! Labels. `llmgw_encrypt_token` is VOLATILE (a fresh random IV every call); everything that
//! reads the keyring is STABLE; `llmgw_mask_token` is the only pure function (IMMUTABLE). All
//! are PARALLEL SAFE (workers build the same keyring from the same environment).
//!
//! NULLs. A NULL `organization_id` is the gateway's managed scope (`llmgateway:managed`), so
//! no function taking it is STRICT. A NULL plaintext or token gives NULL (nothing to seal or
//! open), like `encrypt_token`. A NULL `id` is an error (22004): every token is bound to its
//! row's id, and answering NULL could let an `UPDATE … SET token = NULL, token_ciphertext =
//! llmgw_encrypt_token(…)` drop a key silently.
//!
//! Errors (SQLSTATEs from `errors.rs`): a token copied to another row or organization and a
//! tampered token are the same GCM failure, so they share one SQLSTATE and one message that
//! names both; a key id missing from the keyring names the id (never a secret); an unknown
//! version and a malformed token each have their own. No message carries a secret or a
//! plaintext.
//!
//! The guard: its trigger (`provider_keys_encrypt_guard('format=llmgw')`, src/guard.rs) seals a
//! row an old gateway instance writes in plaintext: it fills `token_ciphertext`, `token_hash`
//! and `token_masked` and sets `token` NULL, all from one plaintext and the row's own id and
//! organization, with [`seal_row`], exactly the way the backfill does.

use pgrx::prelude::*;
use provider_keys_encrypt_core::format::llmgw::{self, Keyring, LlmgwError};
use provider_keys_encrypt_core::format::{base64, Keyring as _, State};
use provider_keys_encrypt_core::keys::KeyError;
use provider_keys_encrypt_core::RowContext;

use super::SecretText;
use crate::errors::{Error, OrRaise};
use crate::keyring::with_keyring;

/// Run `f` with the gateway's keyring.
fn with_gateway_keyring<T>(f: impl FnOnce(&Keyring) -> T) -> Result<T, Error> {
    with_keyring(f)
}

/// The row a token belongs to. A NULL id is refused (22004): see the module doc.
fn row<'a>(id: Option<&'a str>, organization_id: Option<&'a str>) -> RowContext<'a> {
    match id {
        Some(id) => RowContext {
            id,
            organization_id,
        },
        None => Error::NullRowId.raise(),
    }
}

/// What the backfill writes for one plaintext, and what the guard must write (see the module
/// doc): `(token_ciphertext, token_hash, token_masked)`, all under the current secret.
pub fn seal_row(
    ring: &Keyring,
    plaintext: &str,
    ctx: &RowContext<'_>,
) -> Result<(String, String, String), LlmgwError> {
    Ok((
        ring.seal(plaintext, *ctx)?,
        ring.token_hash(plaintext),
        llmgw::mask(plaintext),
    ))
}

// ---------------------------------------------------------------------------------------------
// The SQL functions

/// Seal a plaintext API key for its row as an `llmgw:v2` token under the current secret of
/// `GATEWAY_API_KEY_HASH_SECRET`, with a fresh random IV, exactly as the gateway writes
/// `token_ciphertext`. NULL plaintext: NULL; NULL organization_id: the managed scope.
#[pg_extern(volatile, parallel_safe)]
pub fn llmgw_encrypt_token(
    plaintext: Option<&str>,
    id: Option<&str>,
    organization_id: Option<&str>,
) -> Option<String> {
    let plaintext = plaintext?;
    let ctx = row(id, organization_id);
    Some(
        with_gateway_keyring(|ring| ring.seal(plaintext, ctx))
            .or_raise()
            .or_raise(),
    )
}

/// Open an `llmgw:v2` (or `llmgw:v1`) token of the row (`id`, `organization_id`): the
/// plaintext API key. v2 tokens name their secret's key id; v1 tokens are tried under every
/// secret of the keyring. NULL token: NULL.
#[pg_extern(stable, parallel_safe)]
pub fn llmgw_decrypt_token(
    token: Option<&str>,
    id: Option<&str>,
    organization_id: Option<&str>,
) -> Option<SecretText> {
    let token = token?;
    let ctx = row(id, organization_id);
    let plaintext = with_gateway_keyring(|ring| ring.open(token, ctx))
        .or_raise()
        .or_raise();
    Some(SecretText::new(plaintext))
}

/// The gateway's `token_hash` of a plaintext API key: lowercase hex of HMAC-SHA256 keyed with
/// the current secret.
#[pg_extern(stable, strict, parallel_safe)]
pub fn llmgw_token_hash(plaintext: &str) -> String {
    with_gateway_keyring(|ring| ring.token_hash(plaintext)).or_raise()
}

/// The gateway's `token_masked` of a plaintext API key: its first characters (at most 12,
/// never the last 4) followed by bullets, as the gateway stores it.
#[pg_extern(immutable, strict, parallel_safe)]
pub fn llmgw_mask_token(plaintext: &str) -> String {
    llmgw::mask(plaintext)
}

/// The key id of the current secret (8 hex digits, the id every new `llmgw:v2` token
/// carries). One-way and public: safe to show; compare it with the gateway's.
#[pg_extern(stable, parallel_safe)]
pub fn llmgw_key_id() -> String {
    with_gateway_keyring(|ring| ring.current().kid().to_string()).or_raise()
}

// ---------------------------------------------------------------------------------------------
// Engine internals (pke_internal), for format => 'llmgw'

/// `pke_internal.llmgw_state(token, token_ciphertext, id, organization_id)`: the state of a
/// row in the one vocabulary (`pke_internal.token_state`):
/// * a `token_ciphertext` and no `token`: `current_key` (v2 under the current secret),
///   `previous_key` (v1, or v2 under an older secret: to rotate), `unverified` (opens under no secret for this row,
///   or is not an llmgw token at all);
/// * a `token` (whether or not the row also has a ciphertext: what is in token is the newest
///   write): `plaintext` (to move), unless the token is itself an llmgw token, or a base64
///   token of this extension that authenticates under `ENCRYPTION_KEY` (a table encrypted in
///   format base64 before): `unverified`, never sealed as if it were the API key (the gateway
///   would then read the base64 token as the key);
/// * neither, or a NULL id: `unverified` (nothing the gateway can read).
///
/// Never raises on odd input: only when the gateway's keyring is missing, or `ENCRYPTION_KEY`
/// is set but unusable (see [`is_base64_token`]).
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.llmgw_state(token text, token_ciphertext text, id text, organization_id text)
    RETURNS pke_internal.token_state
    LANGUAGE c STABLE PARALLEL SAFE COST 10
    AS 'MODULE_PATHNAME', 'llmgw_state_wrapper';
COMMENT ON FUNCTION pke_internal.llmgw_state(text, text, text, text) IS
    'Engine internal: the state of a row in the llmgw format (plaintext, current_key, previous_key or unverified).';
",
    requires = ["engine_types"]
)]
pub(crate) fn llmgw_state(
    token: Option<&str>,
    token_ciphertext: Option<&str>,
    id: Option<&str>,
    organization_id: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Oid {
    let state = match (token, token_ciphertext, id) {
        // a value in token is the newest write: an old gateway instance writes a new plaintext
        // key there even when the row has a ciphertext (without the XOR constraint), and the
        // guard seals it over the ciphertext; so does the backfill
        (Some(t), _, Some(_)) => {
            if t.starts_with(llmgw::PREFIX) || is_base64_token(t) {
                State::Unverified
            } else {
                State::Plaintext
            }
        }
        (None, Some(ct), Some(id)) => {
            let ctx = RowContext {
                id,
                organization_id,
            };
            // a ciphertext without the prefix is no plaintext to seal: unverified
            match with_gateway_keyring(|ring| llmgw::classify(ring, ct, &ctx)).or_raise() {
                State::Plaintext => State::Unverified,
                state => state,
            }
        }
        _ => State::Unverified,
    };
    // SAFETY: pgrx hands us this call's fcinfo.
    unsafe { crate::states::state_oid(fcinfo, state) }
}

/// Does `token` authenticate as a base64 token under `ENCRYPTION_KEY` (or a previous key)?
/// On a server without `ENCRYPTION_KEY` nothing can: false (the llmgw backfill says so in a
/// NOTICE: [`base64_check_notice`]). A key that is set but unusable raises: never a guess.
pub(crate) fn is_base64_token(token: &str) -> bool {
    match with_keyring(|ring: &base64::Keyring| ring.classify(token, ())) {
        Ok(state) => state.or_raise().opens(),
        Err(Error::Key(KeyError::Missing)) => false,
        Err(e) => e.raise(),
    }
}

/// `pke_internal.base64_check_notice()`: NULL when `ENCRYPTION_KEY` is set on this server (so
/// the llmgw backfill recognises this extension's base64 tokens in column token); else the
/// NOTICE the backfill prints before it starts. Raises when the key is set but unusable.
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.base64_check_notice()
    RETURNS text
    LANGUAGE c STABLE PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'base64_check_notice_wrapper';
COMMENT ON FUNCTION pke_internal.base64_check_notice() IS
    'Engine internal: NULL, or why the llmgw backfill cannot recognise base64 tokens (ENCRYPTION_KEY not set).';
",
    requires = ["engine_types"]
)]
pub fn base64_check_notice() -> Option<&'static str> {
    match with_keyring(|_: &base64::Keyring| ()) {
        Ok(()) => None,
        Err(Error::Key(KeyError::Missing)) => Some(
            "ENCRYPTION_KEY is not set on this server: a token of format base64 (this \
             extension's other format) in column token cannot be recognised, and would be \
             moved as if it were the key. If this table was ever encrypted with format base64, \
             set ENCRYPTION_KEY and run again.",
        ),
        Err(e) => e.raise(),
    }
}

/// `pke_internal.llmgw_reencrypt(token_ciphertext, id, organization_id)`: rotation. The
/// same plaintext sealed for the same row under the current secret, and its `token_hash`
/// under the current secret. The plaintext stays in a zeroizing buffer and is never returned.
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.llmgw_reencrypt(token_ciphertext text, id text, organization_id text)
    RETURNS TABLE (token_ciphertext text, token_hash text)
    LANGUAGE c VOLATILE PARALLEL SAFE ROWS 1
    AS 'MODULE_PATHNAME', 'llmgw_reencrypt_wrapper';
",
    requires = ["engine_types"]
)]
pub fn llmgw_reencrypt(
    token_ciphertext: Option<&str>,
    id: Option<&str>,
    organization_id: Option<&str>,
) -> TableIterator<'static, (name!(token_ciphertext, String), name!(token_hash, String))> {
    let Some(token) = token_ciphertext else {
        return TableIterator::new(std::iter::empty());
    };
    let ctx = row(id, organization_id);
    let resealed = with_gateway_keyring(|ring| {
        let plaintext = ring.open(token, ctx)?;
        Ok::<_, LlmgwError>((ring.seal(&plaintext, ctx)?, ring.token_hash(&plaintext)))
    })
    .or_raise()
    .or_raise();
    TableIterator::once(resealed)
}

/// `pke_internal.llmgw_key_id_of(token_ciphertext, id, organization_id)`: the key id a token
/// belongs to, for the report: a v2 token's own key id (whether or not that secret is in the
/// keyring: an unknown one tells the operator which secret is missing), a v1 token's secret
/// that opens it; NULL otherwise. Key ids are public.
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.llmgw_key_id_of(token_ciphertext text, id text, organization_id text)
    RETURNS text
    LANGUAGE c STABLE PARALLEL SAFE COST 10
    AS 'MODULE_PATHNAME', 'llmgw_key_id_of_wrapper';
",
    requires = ["engine_types"]
)]
pub fn llmgw_key_id_of(
    token_ciphertext: Option<&str>,
    id: Option<&str>,
    organization_id: Option<&str>,
) -> Option<String> {
    let token = token_ciphertext?;
    if let Some(rest) = token.strip_prefix("llmgw:v2:") {
        return rest
            .split(':')
            .next()
            .and_then(llmgw::KeyId::parse)
            .map(|k| k.to_string());
    }
    let ctx = RowContext {
        id: id?,
        organization_id,
    };
    with_gateway_keyring(|ring| llmgw::open(ring, token, &ctx).ok().map(|(_, o)| o.kid))
        .or_raise()
        .map(|k| k.to_string())
}
