//! The gateway's current token format, `llmgw`: the contract with its Node.js code.
//!
//! ```text
//! keyring   GATEWAY_API_KEY_HASH_SECRET = "s0,s1,…"  split on ',', each trimmed, blanks dropped;
//!           s0 is the current secret (all new writes), the rest are older ones
//! data key  HKDF-SHA256(ikm = UTF-8(secret), salt = "", info = "provider-key-token:v1", 32 bytes)
//! key id    hex(HKDF-SHA256(ikm = UTF-8(secret), salt = "", info = "gateway-secret-key-id:v1", 4))
//! AAD       UTF-8("provider_key|" ‖ row id ‖ "|" ‖ (organization_id or "llmgateway:managed"))
//! v2 token  llmgw:v2:<kid>:<iv>:<ct>:<tag>    AES-256-GCM, iv 12 bytes, tag 16 bytes,
//! v1 token  llmgw:v1:<iv>:<ct>:<tag>          every part base64url without padding
//! hash      hex(HMAC-SHA256(key = UTF-8(current secret), UTF-8(plaintext)))
//! mask      first min(12, n − 4) UTF-16 units, then 4 or 5 bullets (see [`mask`])
//! ```
//!
//! **v1** tokens carry no key id, so every secret of the keyring is tried. They use the same
//! data-key derivation and the same associated data as v2 (the gateway's public v1 writer and
//! its v1/v2 reader do exactly this). Caveat: an earlier gateway release derived the v1 data
//! key from a different variable (`PROVIDER_KEY_ENCRYPTION_KEY`, base64-decoded); v1 rows
//! written by that release open under neither the current gateway nor this module.
//!
//! **Binding.** The associated data binds a token to its row id and organization: a token
//! copied to another row or organization fails authentication exactly as a tampered one does
//! (GCM cannot tell them apart). A NULL organization and the literal organization id
//! `llmgateway:managed` give the same associated data, as in the gateway.
//!
//! **Key hygiene.** Each keyring entry keeps the expanded AES key schedule (wiped on drop by
//! the `zeroize` features of `aes`/`ghash`, see Cargo.toml) and the secret's bytes (the HMAC
//! key) in a [`Zeroizing`] buffer; the raw 32-byte data key only exists in a `Zeroizing`
//! buffer while the entry is built. The `hkdf` and `hmac` crates do not wipe their internal
//! state on drop: the HKDF PRK and HMAC pads of a derivation may linger on the stack.
//!
//! Pure Rust (no pgrx). No error message, `Debug` output or panic message ever contains a
//! secret, a key or a plaintext; the only input an error may name is a well-formed key id.

use std::fmt;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::State;
use crate::RowContext;

/// The environment variable holding the gateway's keyring.
pub const ENV_VAR: &str = "GATEWAY_API_KEY_HASH_SECRET";
/// Every llmgw token starts with this; a value that does not is a plaintext.
pub const PREFIX: &str = "llmgw:";
/// The scope of a row whose `organization_id` is NULL (a platform-managed key).
pub const MANAGED_SCOPE: &str = "llmgateway:managed";
/// HKDF `info` of the data key.
pub const DATA_KEY_INFO: &str = "provider-key-token:v1";
/// HKDF `info` of the key id.
pub const KEY_ID_INFO: &str = "gateway-secret-key-id:v1";
/// Length of the GCM IV.
pub const IV_LEN: usize = 12;
/// Length of the GCM tag.
pub const TAG_LEN: usize = 16;
/// Length of the data key (AES-256).
pub const DATA_KEY_LEN: usize = 32;
/// Bytes of HKDF output in a key id (written as twice as many hex digits).
pub const KEY_ID_BYTES: usize = 4;
/// The bullet a mask ends with.
pub const MASK_BULLET: char = '\u{2022}';
/// Largest plaintext (UTF-8 bytes) [`seal_v2`] accepts: 64 KiB, far above any provider key.
pub const MAX_PLAINTEXT_LEN: usize = 64 * 1024;
/// Largest token [`open`] accepts: the v2 token of a [`MAX_PLAINTEXT_LEN`]-byte plaintext
/// (87 440 characters). Longer values are refused before anything is decoded or allocated.
pub const MAX_TOKEN_LEN: usize = "llmgw:v2:".len()
    + 2 * KEY_ID_BYTES
    + 1
    + b64_len(IV_LEN)
    + 1
    + b64_len(MAX_PLAINTEXT_LEN)
    + 1
    + b64_len(TAG_LEN);

/// Length of unpadded base64 of `n` bytes.
const fn b64_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// base64url, never padded. Decoding refuses padding and any character outside the
/// base64url alphabet but, like Node, ignores unused trailing bits: see [`decode_base64url`].
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// What is wrong with the shape of an llmgw token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not 6 (v2) or 5 (v1) colon-separated parts.
    PartCount,
    /// The v2 key id is not 8 lowercase hex digits.
    KeyId,
    /// A part is not unpadded base64url.
    Base64,
    /// The IV does not decode to 12 bytes.
    IvLength,
    /// The tag does not decode to 16 bytes.
    TagLength,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::PartCount => {
                "wrong number of parts (llmgw:v2 has 6 colon-separated parts, llmgw:v1 has 5)"
            }
            Malformed::KeyId => "the key id is not 8 lowercase hex digits",
            Malformed::Base64 => "a part is not unpadded base64url",
            Malformed::IvLength => "the iv does not decode to 12 bytes",
            Malformed::TagLength => "the tag does not decode to 16 bytes",
        })
    }
}

/// Why a keyring could not be built or a value could not be sealed or opened. The messages
/// are fixed strings; [`LlmgwError::UnknownKeyId`] names a key id, which is public.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LlmgwError {
    #[error("GATEWAY_API_KEY_HASH_SECRET is not set or holds no secret")]
    MissingSecret,
    #[error("value is not an llmgw token: it does not start with \"llmgw:\"")]
    NotAToken,
    #[error("llmgw token has an unknown version: only llmgw:v1 and llmgw:v2 are supported")]
    UnknownVersion,
    #[error("malformed llmgw token: {0}")]
    Malformed(Malformed),
    #[error(
        "llmgw token was sealed under key id {0}, which is not in the \
         GATEWAY_API_KEY_HASH_SECRET keyring"
    )]
    UnknownKeyId(KeyId),
    #[error(
        "token does not authenticate for this row: tampered, or copied from another row or \
         organization (or, for llmgw:v1, sealed under a secret no longer in the keyring)"
    )]
    DoesNotAuthenticate,
    #[error("decrypted token is not valid UTF-8 text without NUL bytes")]
    NotText,
    #[error("value is too long: plaintexts are limited to 65536 bytes, llmgw tokens to 87440")]
    TooLong,
    #[error("could not obtain random bytes from the operating system")]
    NoRandomness,
}

/// A key id: the first 4 bytes of HKDF-SHA256(secret, info = `gateway-secret-key-id:v1`).
/// One-way and public: it is stored in every v2 token. Displays as 8 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; KEY_ID_BYTES]);

impl KeyId {
    /// Parse 8 lowercase hex digits (the only form the gateway writes).
    pub fn parse(s: &str) -> Option<KeyId> {
        let b = s.as_bytes();
        if b.len() != 2 * KEY_ID_BYTES || !b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        let mut id = [0u8; KEY_ID_BYTES];
        for (i, out) in id.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(KeyId(id))
    }

    /// The 8 lowercase hex digits the gateway writes, without allocating.
    fn hex(&self) -> [u8; 2 * KEY_ID_BYTES] {
        let mut out = [0u8; 2 * KEY_ID_BYTES];
        lower_hex(&self.0, &mut out);
        out
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.hex()).expect("hex digits are ASCII"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// HKDF-SHA256 with an empty salt (RFC 5869: the same as HashLen zero bytes, and what Node's
/// `hkdfSync(…, Buffer.alloc(0), …)` does).
fn hkdf_sha256(ikm: &[u8], info: &[u8], okm: &mut [u8]) {
    Hkdf::<Sha256>::new(Some(&[]), ikm)
        .expand(info, okm)
        .expect("32 and 4 bytes are far below HKDF-SHA256's 8160-byte limit");
}

/// One secret of the keyring, ready to use. `Debug` shows the key id only.
pub struct Secret {
    kid: KeyId,
    cipher: Aes256Gcm,
    hmac_key: Zeroizing<Vec<u8>>,
}

impl Secret {
    /// Derive the key id and data key of one (already trimmed) secret.
    pub fn new(secret: &str) -> Secret {
        let ikm = secret.as_bytes();
        let mut kid = [0u8; KEY_ID_BYTES];
        hkdf_sha256(ikm, KEY_ID_INFO.as_bytes(), &mut kid);
        let mut data_key = Zeroizing::new([0u8; DATA_KEY_LEN]);
        hkdf_sha256(ikm, DATA_KEY_INFO.as_bytes(), &mut data_key[..]);
        Secret {
            kid: KeyId(kid),
            cipher: Aes256Gcm::new((&*data_key).into()),
            hmac_key: Zeroizing::new(ikm.to_vec()),
        }
    }

    pub fn kid(&self) -> KeyId {
        self.kid
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// JavaScript's `String.prototype.trim` set: ECMAScript WhiteSpace and LineTerminator. It
/// differs from Rust's `char::is_whitespace` in two places: U+FEFF (trimmed here, not by
/// Rust) and U+0085 (trimmed by Rust, not here).
fn is_js_trim(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n' | '\u{0B}' | '\u{0C}' | '\r' | ' ' | '\u{A0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200A}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202F}'
                | '\u{205F}'
                | '\u{3000}'
                | '\u{FEFF}'
    )
}

/// The gateway's keyring: entry 0 is the current secret, the others are older ones.
/// `Debug` shows key ids only.
pub struct Keyring {
    entries: Vec<Secret>,
}

impl Keyring {
    /// Build the keyring from the value of `GATEWAY_API_KEY_HASH_SECRET` as the gateway does:
    /// split on `,`, trim each entry (JavaScript's `trim()`), drop the empty ones. A value with
    /// no secret left is [`LlmgwError::MissingSecret`] (there is no development fallback).
    pub fn parse(env_value: &str) -> Result<Keyring, LlmgwError> {
        let entries: Vec<Secret> = env_value
            .split(',')
            .map(|s| s.trim_matches(is_js_trim))
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .collect();
        if entries.is_empty() {
            return Err(LlmgwError::MissingSecret);
        }
        Ok(Keyring { entries })
    }

    /// The current secret: all new tokens and hashes use it.
    pub fn current(&self) -> &Secret {
        &self.entries[0]
    }

    /// All secrets, current first, in the order of the environment variable.
    pub fn entries(&self) -> &[Secret] {
        &self.entries
    }

    /// The entries (with their index) whose key id is `kid`.
    pub fn find(&self, kid: KeyId) -> impl Iterator<Item = (usize, &Secret)> {
        self.entries
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.kid == kid)
    }

    /// [`token_hash`] under the current secret.
    pub fn token_hash(&self, plaintext: &str) -> String {
        token_hash(self.current(), plaintext)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "kids",
                &self.entries.iter().map(|s| s.kid).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The scope part of the associated data.
pub fn scope<'a>(ctx: &RowContext<'a>) -> &'a str {
    ctx.organization_id.unwrap_or(MANAGED_SCOPE)
}

/// The associated data binding a token to its row: `provider_key|<id>|<scope>`.
pub fn associated_data(ctx: &RowContext<'_>) -> Vec<u8> {
    const HEAD: &[u8] = b"provider_key|";
    let scope = scope(ctx).as_bytes();
    let mut aad = Vec::with_capacity(HEAD.len() + ctx.id.len() + 1 + scope.len());
    aad.extend_from_slice(HEAD);
    aad.extend_from_slice(ctx.id.as_bytes());
    aad.push(b'|');
    aad.extend_from_slice(scope);
    aad
}

/// Seal `plaintext` for the row `ctx` as a v2 token under `entry`, with a fresh IV from the
/// operating system's CSPRNG (`getrandom(2)` on every call: nothing a `fork()` duplicates).
pub fn seal_v2(
    entry: &Secret,
    plaintext: &str,
    ctx: &RowContext<'_>,
) -> Result<String, LlmgwError> {
    let mut iv = [0u8; IV_LEN];
    OsRng
        .try_fill_bytes(&mut iv)
        .map_err(|_| LlmgwError::NoRandomness)?;
    seal_v2_with_iv(entry, &iv, plaintext, ctx)
}

/// Seal with a caller-chosen IV. Deterministic, for test vectors: never reuse an IV with the
/// same secret outside tests.
pub fn seal_v2_with_iv(
    entry: &Secret,
    iv: &[u8; IV_LEN],
    plaintext: &str,
    ctx: &RowContext<'_>,
) -> Result<String, LlmgwError> {
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(LlmgwError::TooLong);
    }
    // The plaintext is copied once, into a buffer that is wiped on drop, and encrypted there.
    let mut buf = Zeroizing::new(Vec::new());
    buf.try_reserve_exact(plaintext.len())
        .map_err(|_| LlmgwError::TooLong)?;
    buf.extend_from_slice(plaintext.as_bytes());
    let tag = entry
        .cipher
        .encrypt_in_place_detached(Nonce::from_slice(iv), &associated_data(ctx), &mut buf)
        .map_err(|_| LlmgwError::TooLong)?;

    // The token is assembled in one buffer of its exact length, base64 written in place: no
    // String pushes (each a memcpy call, which musl makes costly for small sizes).
    const HEAD: &[u8] = b"llmgw:v2:";
    let kid = entry.kid.hex();
    let len = HEAD.len()
        + kid.len()
        + 1
        + b64_len(IV_LEN)
        + 1
        + b64_len(buf.len())
        + 1
        + b64_len(TAG_LEN);
    let mut out = Vec::new();
    out.try_reserve_exact(len)
        .map_err(|_| LlmgwError::TooLong)?;
    out.resize(len, 0);
    out[..HEAD.len()].copy_from_slice(HEAD);
    let mut at = HEAD.len();
    out[at..at + kid.len()].copy_from_slice(&kid);
    at += kid.len();
    for part in [&iv[..], &buf[..], &tag[..]] {
        out[at] = b':';
        at += 1;
        at += B64URL
            .encode_slice(part, &mut out[at..])
            .expect("the buffer is sized for the encoding");
    }
    debug_assert_eq!(at, len);
    Ok(String::from_utf8(out).expect("base64url and ASCII"))
}

/// The token versions this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// How a token opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub version: Version,
    /// Index in [`Keyring::entries`] of the secret it authenticated under (0 = current).
    pub entry: usize,
    /// That secret's key id (for v2, the token's own key id).
    pub kid: KeyId,
}

impl Opened {
    /// [`State::Current`] for a v2 token under the current secret, else [`State::Previous`]
    /// (v1, or an older secret: due for re-sealing).
    pub fn state(&self) -> State {
        if self.version == Version::V2 && self.entry == 0 {
            State::Current
        } else {
            State::Previous
        }
    }
}

/// Decode one part of a token: unpadded base64url.
///
/// Node's decoder (the gateway pads, maps `-`/`_` to `+`/`/`, then `Buffer.from(x,
/// 'base64')`) is lenient: it silently skips characters outside the alphabet (spaces, `!`,
/// `.`, …), stops at the first `=`, drops a dangling character (length ≡ 1 mod 4) and ignores
/// unused trailing bits. We accept exactly the strings the gateway's writer can produce —
/// the base64url alphabet, no padding, length ≢ 1 (mod 4) — and, like Node, ignore unused
/// trailing bits. On every string we accept we return the same bytes as Node (checked
/// against Node in `core/tests/llmgw_node_interop.rs`); anything else is
/// [`Malformed::Base64`].
///
/// Why stricter than Node: a token containing junk was not written by the gateway but
/// altered afterwards (pasted with whitespace, hand-edited, truncated). For a tool that
/// rewrites rows, refusing it loudly (such a value is [`State::Unverified`] and left alone)
/// is safer than repairing it silently; it also keeps the text ↔ bytes mapping one-to-one
/// up to the unused trailing bits. Ignoring those costs nothing: GCM authenticates the
/// decoded bytes, and refusing them would refuse tokens the gateway opens.
pub fn decode_base64url(part: &str) -> Result<Vec<u8>, LlmgwError> {
    let est = base64::decoded_len_estimate(part.len());
    let mut out = Vec::new();
    out.try_reserve_exact(est)
        .map_err(|_| LlmgwError::TooLong)?;
    out.resize(est, 0);
    let n = B64URL
        .decode_slice(part.as_bytes(), &mut out)
        .map_err(|_| LlmgwError::Malformed(Malformed::Base64))?;
    out.truncate(n);
    Ok(out)
}

/// Open `token` for the row `ctx`: the plaintext, and how it opened.
pub fn open(
    ring: &Keyring,
    token: &str,
    ctx: &RowContext<'_>,
) -> Result<(Zeroizing<String>, Opened), LlmgwError> {
    let (bytes, opened) = open_bytes(ring, token, ctx)?;
    Ok((into_text(bytes)?, opened))
}

/// Which state `value` is in under `ring` for the row `ctx`. Never fails. A token that
/// authenticates counts as opened even if its plaintext is not text.
pub fn classify(ring: &Keyring, value: &str, ctx: &RowContext<'_>) -> State {
    if !value.starts_with(PREFIX) {
        return State::Plaintext;
    }
    match open_bytes(ring, value, ctx) {
        Ok((_, opened)) => opened.state(),
        Err(_) => State::Unverified,
    }
}

/// An llmgw token is bound to its row: `Binding` is the row's [`RowContext`]. In llmgw,
/// [`State::Plaintext`] is a value without the `llmgw:` prefix; [`State::Previous`] a v1 token
/// or a v2 token under an older secret; [`State::Unverified`] a prefixed value that opens under
/// no secret (never a plaintext to seal: the gateway would read it as a broken token).
impl super::Keyring for Keyring {
    type Binding<'a> = RowContext<'a>;
    type Error = LlmgwError;

    /// Never fails.
    fn classify(&self, value: &str, row: RowContext<'_>) -> Result<State, LlmgwError> {
        Ok(classify(self, value, &row))
    }

    /// A v2 token under the current secret, with a fresh IV.
    fn seal(&self, plaintext: &str, row: RowContext<'_>) -> Result<String, LlmgwError> {
        seal_v2(self.current(), plaintext, &row)
    }

    fn open(&self, token: &str, row: RowContext<'_>) -> Result<Zeroizing<String>, LlmgwError> {
        open(self, token, &row).map(|(text, _)| text)
    }

    /// The plaintext, sealed again as a v2 token under the current secret.
    fn reseal(&self, token: &str, row: RowContext<'_>) -> Result<String, LlmgwError> {
        let (plaintext, _) = open(self, token, &row)?;
        seal_v2(self.current(), &plaintext, &row)
    }
}

/// The checks run in the gateway's order: version, part count, key id, part decoding and
/// lengths, then authentication.
fn open_bytes(
    ring: &Keyring,
    token: &str,
    ctx: &RowContext<'_>,
) -> Result<(Zeroizing<Vec<u8>>, Opened), LlmgwError> {
    if !token.starts_with(PREFIX) {
        return Err(LlmgwError::NotAToken);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(LlmgwError::TooLong);
    }
    // Only the first 6 colon-separated parts are kept; `count` stops at 7 ("too many").
    let mut parts = [""; 6];
    let mut count = 0;
    for p in token.split(':') {
        if count == parts.len() {
            count += 1;
            break;
        }
        parts[count] = p;
        count += 1;
    }
    // Like the gateway's `startsWith("llmgw:v2:")`: the version needs its trailing colon.
    let version = match parts[1] {
        "v2" if count > 2 => Version::V2,
        "v1" if count > 2 => Version::V1,
        _ => return Err(LlmgwError::UnknownVersion),
    };
    let (kid, iv, ct, tag) = match version {
        Version::V2 if count == 6 => {
            let kid = KeyId::parse(parts[2]).ok_or(LlmgwError::Malformed(Malformed::KeyId))?;
            if ring.find(kid).next().is_none() {
                return Err(LlmgwError::UnknownKeyId(kid));
            }
            (Some(kid), parts[3], parts[4], parts[5])
        }
        Version::V1 if count == 5 => (None, parts[2], parts[3], parts[4]),
        _ => return Err(LlmgwError::Malformed(Malformed::PartCount)),
    };
    let iv = decode_base64url(iv)?;
    let ct = decode_base64url(ct)?;
    let tag = decode_base64url(tag)?;
    if iv.len() != IV_LEN {
        return Err(LlmgwError::Malformed(Malformed::IvLength));
    }
    if tag.len() != TAG_LEN {
        return Err(LlmgwError::Malformed(Malformed::TagLength));
    }

    let aad = associated_data(ctx);
    let mut scratch = Zeroizing::new(Vec::new());
    scratch
        .try_reserve_exact(ct.len())
        .map_err(|_| LlmgwError::TooLong)?;
    let candidates = ring
        .entries
        .iter()
        .enumerate()
        .filter(|(_, s)| kid.is_none_or(|k| s.kid == k));
    for (index, secret) in candidates {
        scratch.clear();
        scratch.extend_from_slice(&ct);
        let ok = secret
            .cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&iv),
                &aad,
                &mut scratch,
                Tag::from_slice(&tag),
            )
            .is_ok();
        if ok {
            let opened = Opened {
                version,
                entry: index,
                kid: secret.kid,
            };
            return Ok((scratch, opened));
        }
    }
    Err(LlmgwError::DoesNotAuthenticate)
}

/// Decrypted bytes as text PostgreSQL can store: valid UTF-8 without NUL bytes (the gateway
/// only ever encrypts such text). Refused bytes are wiped.
fn into_text(mut bytes: Zeroizing<Vec<u8>>) -> Result<Zeroizing<String>, LlmgwError> {
    if bytes.contains(&0) {
        return Err(LlmgwError::NotText);
    }
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(s) => Ok(Zeroizing::new(s)),
        Err(e) => {
            drop(Zeroizing::new(e.into_bytes()));
            Err(LlmgwError::NotText)
        }
    }
}

/// The gateway's `token_hash`: lowercase hex of HMAC-SHA256 keyed with the secret's UTF-8
/// bytes (the current secret: see [`Keyring::token_hash`]) over the plaintext's UTF-8 bytes.
pub fn token_hash(current: &Secret, plaintext: &str) -> String {
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&current.hmac_key)
        .expect("HMAC takes any key length");
    mac.update(plaintext.as_bytes());
    // Hex digits into a stack buffer, then one copy into the result: a `format!` per byte made
    // 33 allocations and 32 two-byte copies per row, and under musl (postgres:17-alpine) each
    // small memcpy costs tens of cycles: perf put 53% of the function's time in memcpy.
    let mut hex = [0u8; 64];
    lower_hex(&mac.finalize().into_bytes(), &mut hex);
    String::from_utf8(hex.to_vec()).expect("hex digits are ASCII")
}

/// Lowercase hex of `bytes` into `out` (twice as long), without allocating.
fn lower_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    debug_assert_eq!(out.len(), 2 * bytes.len());
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

/// The gateway's `token_masked`, as stored. With n the plaintext's length in UTF-16 code
/// units (JavaScript's `length`), keep the first v = max(0, min(12, n − 4)) units and append
/// min(max(n − v, 4), 5) bullets (U+2022); an empty plaintext gives an empty mask. Where the
/// cut splits a surrogate pair the gateway's string ends in a lone high surrogate, which its
/// driver writes as U+FFFD: so does this function.
pub fn mask(plaintext: &str) -> String {
    let n: usize = plaintext.chars().map(char::len_utf16).sum();
    if n == 0 {
        return String::new();
    }
    let keep = n.saturating_sub(4).min(12);
    let bullets = (n - keep).clamp(4, 5);
    let mut out = String::with_capacity(4 * keep + 3 * bullets);
    let mut units = 0;
    for c in plaintext.chars() {
        if units >= keep {
            break;
        }
        let w = c.len_utf16();
        out.push(if units + w <= keep { c } else { '\u{FFFD}' });
        units += w;
    }
    out.extend(std::iter::repeat_n(MASK_BULLET, bullets));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: RowContext<'static> = RowContext {
        id: "row-1",
        organization_id: Some("org-1"),
    };
    const MANAGED_ROW: RowContext<'static> = RowContext {
        id: "row-1",
        organization_id: None,
    };

    fn ring(env: &str) -> Keyring {
        Keyring::parse(env).unwrap()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn open_err(r: &Keyring, token: &str, ctx: &RowContext<'_>) -> LlmgwError {
        // not expect_err: that would print the plaintext
        match open(r, token, ctx) {
            Ok(_) => panic!("the token opened; an error was expected"),
            Err(e) => e,
        }
    }

    /// v2 → v1: the same token without its key id (same data key, same associated data).
    fn as_v1(token: &str) -> String {
        let p: Vec<&str> = token.split(':').collect();
        assert_eq!(p.len(), 6);
        format!("llmgw:v1:{}:{}:{}", p[3], p[4], p[5])
    }

    /// Replace part `i` (0-based, of the colon-separated parts) of a token.
    fn with_part(token: &str, i: usize, part: &str) -> String {
        let mut p: Vec<&str> = token.split(':').collect();
        p[i] = part;
        p.join(":")
    }

    /// RFC 5869 test case 3: SHA-256 with an empty salt and empty info.
    #[test]
    fn hkdf_with_empty_salt_is_rfc5869() {
        let mut okm = [0u8; 42];
        hkdf_sha256(&[0x0b; 22], b"", &mut okm);
        assert_eq!(
            okm.to_vec(),
            hex(concat!(
                "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d",
                "9d201395faa4b61a96c8"
            ))
        );
    }

    /// RFC 4231 test case 2 (key "Jefe"); Node's createHmac gives the same.
    #[test]
    fn token_hash_is_hmac_sha256_under_the_current_secret() {
        let expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        let r = ring("Jefe, other");
        assert_eq!(r.token_hash("what do ya want for nothing?"), expected);
        assert_eq!(
            token_hash(r.current(), "what do ya want for nothing?"),
            expected
        );
        assert_ne!(
            token_hash(&r.entries()[1], "what do ya want for nothing?"),
            expected
        );
    }

    /// Produced by tests/interop/llmgw_gateway.mjs (node:crypto) with the same fixed IV.
    #[test]
    fn node_vectors_match_byte_for_byte() {
        let r = ring("Jefe");
        let iv: [u8; IV_LEN] = hex("000102030405060708090a0b").try_into().unwrap();
        assert_eq!(r.current().kid().to_string(), "5934dc67");
        let t = seal_v2_with_iv(r.current(), &iv, "sk-test-abc123", &ROW).unwrap();
        assert_eq!(
            t,
            "llmgw:v2:5934dc67:AAECAwQFBgcICQoL:F6pM-nE1ZrkFUXUWRbs:R1i2a6k1dAij8DEDDaIobA"
        );
        let t = seal_v2_with_iv(r.current(), &iv, "", &MANAGED_ROW).unwrap();
        assert_eq!(
            t,
            "llmgw:v2:5934dc67:AAECAwQFBgcICQoL::AhNUWxapsYcxl8Wxek-f3A"
        );
        let v1 = "llmgw:v1:AAECAwQFBgcICQoL:F6pM-nE1ZrkFUXUWRbs:R1i2a6k1dAij8DEDDaIobA";
        let (pt, how) = open(&r, v1, &ROW).unwrap();
        assert_eq!(pt.as_str(), "sk-test-abc123");
        assert_eq!((how.version, how.entry), (Version::V1, 0));
        // Node's kids for " Jefe ,\u3000sécret-ü\u{feff}, ,\u{85}x": JS trim() semantics.
        let kids: Vec<String> = ring(" Jefe ,\u{3000}sécret-ü\u{feff}, ,\u{85}x")
            .entries()
            .iter()
            .map(|s| s.kid().to_string())
            .collect();
        assert_eq!(kids, ["5934dc67", "72fa5905", "885d0063"]);
    }

    #[test]
    fn keyring_parsing() {
        assert_eq!(Keyring::parse("").err(), Some(LlmgwError::MissingSecret));
        assert_eq!(
            Keyring::parse(" ,\t, \u{feff} ,").err(),
            Some(LlmgwError::MissingSecret)
        );
        let r = ring(" a ,, b\n,\u{3000}c\u{2028}");
        let kids: Vec<KeyId> = r.entries().iter().map(Secret::kid).collect();
        assert_eq!(kids, ["a", "b", "c"].map(|s| Secret::new(s).kid()).to_vec());
        // U+0085 is whitespace to Rust but not to JavaScript's trim(): it stays.
        assert_eq!(
            ring("\u{85}x").current().kid(),
            Secret::new("\u{85}x").kid()
        );
        assert_ne!(ring("\u{85}x").current().kid(), Secret::new("x").kid());
        assert_eq!(
            r.find(Secret::new("b").kid())
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            [1]
        );
    }

    #[test]
    fn key_id_parse_and_display() {
        let k = KeyId::parse("00ff7a10").unwrap();
        assert_eq!(k.to_string(), "00ff7a10");
        assert_eq!(format!("{k:?}"), "KeyId(00ff7a10)");
        for bad in [
            "00FF7A10",
            "00ff7a1",
            "00ff7a100",
            "00ff7a1g",
            "",
            "+0ff7a10",
        ] {
            assert_eq!(KeyId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trips() {
        let r = ring("current-secret, older-secret");
        let ten_kb: String = "sk-ünï😀-".repeat(900);
        assert!(ten_kb.len() > 10_000);
        for pt in [
            "",
            "x",
            "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789",
            "ünïcødé ✓ 中文 𝒳😀",
            "colons:and|pipes|inside",
            ten_kb.as_str(),
        ] {
            for ctx in [ROW, MANAGED_ROW] {
                let t = seal_v2(r.current(), pt, &ctx).unwrap();
                assert!(t.starts_with(&format!("llmgw:v2:{}:", r.current().kid())));
                assert_eq!(t.split(':').count(), 6);
                let (back, how) = open(&r, &t, &ctx).unwrap();
                assert_eq!(back.as_str(), pt);
                assert_eq!(how.state(), State::Current);
                assert_eq!(
                    (how.version, how.entry, how.kid),
                    (Version::V2, 0, r.current().kid())
                );
                assert_eq!(classify(&r, &t, &ctx), State::Current);
            }
        }
        let empty = seal_v2(r.current(), "", &ROW).unwrap();
        assert_eq!(
            empty.split(':').nth(4),
            Some(""),
            "empty plaintext, empty ct part"
        );
    }

    #[test]
    fn null_organization_is_the_managed_scope() {
        let r = ring("s");
        let t = seal_v2(r.current(), "sk-managed", &MANAGED_ROW).unwrap();
        let literal = RowContext {
            id: "row-1",
            organization_id: Some(MANAGED_SCOPE),
        };
        assert_eq!(open(&r, &t, &literal).unwrap().0.as_str(), "sk-managed");
        assert_eq!(
            associated_data(&MANAGED_ROW),
            b"provider_key|row-1|llmgateway:managed"
        );
        for other in [Some(""), Some("org-1")] {
            let ctx = RowContext {
                id: "row-1",
                organization_id: other,
            };
            assert_eq!(open_err(&r, &t, &ctx), LlmgwError::DoesNotAuthenticate);
        }
    }

    #[test]
    fn copied_to_another_row_or_organization_does_not_authenticate() {
        let r = ring("s");
        let t = seal_v2(r.current(), "sk-bound", &ROW).unwrap();
        for ctx in [
            RowContext {
                id: "row-2",
                organization_id: Some("org-1"),
            },
            RowContext {
                id: "row-1",
                organization_id: Some("org-2"),
            },
            MANAGED_ROW,
        ] {
            assert_eq!(open_err(&r, &t, &ctx), LlmgwError::DoesNotAuthenticate);
            assert_eq!(classify(&r, &t, &ctx), State::Unverified);
        }
        let v1 = as_v1(&t);
        assert_eq!(
            open_err(
                &r,
                &v1,
                &RowContext {
                    id: "row-2",
                    organization_id: Some("org-1")
                }
            ),
            LlmgwError::DoesNotAuthenticate
        );
    }

    #[test]
    fn every_bit_flip_of_iv_ct_and_tag_is_refused() {
        let r = ring("s");
        let t = seal_v2(r.current(), "sk-ünï-✓", &ROW).unwrap();
        for part in [3, 4, 5] {
            let raw = decode_base64url(t.split(':').nth(part).unwrap()).unwrap();
            for byte in 0..raw.len() {
                for bit in 0..8 {
                    let mut bad = raw.clone();
                    bad[byte] ^= 1 << bit;
                    let tampered = with_part(&t, part, &B64URL.encode(&bad));
                    assert_eq!(
                        open_err(&r, &tampered, &ROW),
                        LlmgwError::DoesNotAuthenticate,
                        "part {part} byte {byte} bit {bit}"
                    );
                }
            }
        }
    }

    #[test]
    fn tampered_kid_and_version() {
        let r = ring("s");
        let t = seal_v2(r.current(), "sk", &ROW).unwrap();
        let kid = r.current().kid().to_string();
        let other = format!("{}{}", if &kid[..1] == "0" { "1" } else { "0" }, &kid[1..]);
        let e = open_err(&r, &with_part(&t, 2, &other), &ROW);
        assert_eq!(e, LlmgwError::UnknownKeyId(KeyId::parse(&other).unwrap()));
        assert!(e.to_string().contains(&other));
        for v in ["v3", "v0", "V2", "", "v22"] {
            assert_eq!(
                open_err(&r, &with_part(&t, 1, v), &ROW),
                LlmgwError::UnknownVersion
            );
        }
    }

    #[test]
    fn key_id_not_in_the_ring() {
        let old = ring("old");
        let t = seal_v2(old.current(), "sk", &ROW).unwrap();
        let e = open_err(&ring("new"), &t, &ROW);
        assert_eq!(e, LlmgwError::UnknownKeyId(old.current().kid()));
        assert!(!e.to_string().contains("old") && !e.to_string().contains("new"));
        assert_eq!(classify(&ring("new"), &t, &ROW), State::Unverified);
    }

    #[test]
    fn rotation_v2_under_an_older_secret() {
        let old = ring("old-secret");
        let t = seal_v2(old.current(), "sk-rotate", &ROW).unwrap();
        let r = ring("new-secret,old-secret");
        let (pt, how) = open(&r, &t, &ROW).unwrap();
        assert_eq!(pt.as_str(), "sk-rotate");
        assert_eq!(
            (how.version, how.entry, how.kid),
            (Version::V2, 1, old.current().kid())
        );
        assert_eq!(classify(&r, &t, &ROW), State::Previous);
        // sealing with a non-current entry is allowed (tests, tooling)
        let t2 = seal_v2(&r.entries()[1], "sk-x", &ROW).unwrap();
        assert_eq!(classify(&old, &t2, &ROW), State::Current);
    }

    #[test]
    fn v1_is_tried_under_every_secret() {
        let r = ring("s-new, s-mid ,s-old");
        for (i, secret) in r.entries().iter().enumerate() {
            let v1 = as_v1(&seal_v2(secret, "sk-legacy", &ROW).unwrap());
            let (pt, how) = open(&r, &v1, &ROW).unwrap();
            assert_eq!(pt.as_str(), "sk-legacy");
            assert_eq!(
                (how.version, how.entry, how.kid),
                (Version::V1, i, secret.kid())
            );
            // even under the current secret, v1 is due for rewriting as v2
            assert_eq!(classify(&r, &v1, &ROW), State::Previous);
        }
        let v1 = as_v1(&seal_v2(&Secret::new("s-gone"), "sk", &ROW).unwrap());
        assert_eq!(open_err(&r, &v1, &ROW), LlmgwError::DoesNotAuthenticate);
        assert_eq!(classify(&r, &v1, &ROW), State::Unverified);
    }

    #[test]
    fn malformed_tokens() {
        let r = ring("s");
        let t = seal_v2(r.current(), "sk-shape", &ROW).unwrap();
        let v1 = as_v1(&t);
        let m = |x: Malformed| LlmgwError::Malformed(x);
        let cases: Vec<(String, LlmgwError)> = vec![
            (format!("{t}:"), m(Malformed::PartCount)),
            (format!("{t}:x:y"), m(Malformed::PartCount)),
            (
                t.rsplit_once(':').unwrap().0.to_string(),
                m(Malformed::PartCount),
            ),
            ("llmgw:v2:".into(), m(Malformed::PartCount)),
            ("llmgw:v1:a".into(), m(Malformed::PartCount)),
            ("llmgw:v2".into(), LlmgwError::UnknownVersion),
            (format!("{v1}:"), m(Malformed::PartCount)),
            (
                v1.rsplit_once(':').unwrap().0.to_string(),
                m(Malformed::PartCount),
            ),
            (with_part(&t, 2, "ABCDEF12"), m(Malformed::KeyId)),
            (with_part(&t, 2, "abc"), m(Malformed::KeyId)),
            (with_part(&t, 3, "AAECAwQFBgcICQo!"), m(Malformed::Base64)),
            (with_part(&t, 3, "AAECAwQF BgcICQoL"), m(Malformed::Base64)),
            (with_part(&t, 3, "AAECAwQFBgcICQoL="), m(Malformed::Base64)),
            (with_part(&t, 3, "AAECAwQFBgcICQo+"), m(Malformed::Base64)),
            (with_part(&t, 3, "AAECAwQFBgcICQoLA"), m(Malformed::Base64)),
            (with_part(&v1, 3, "é"), m(Malformed::Base64)),
            (
                with_part(&t, 3, &B64URL.encode([0u8; 11])),
                m(Malformed::IvLength),
            ),
            (
                with_part(&t, 3, &B64URL.encode([0u8; 13])),
                m(Malformed::IvLength),
            ),
            (with_part(&v1, 2, ""), m(Malformed::IvLength)),
            (
                with_part(&t, 5, &B64URL.encode([0u8; 12])),
                m(Malformed::TagLength),
            ),
            (with_part(&t, 5, ""), m(Malformed::TagLength)),
            ("llmgw:".into(), LlmgwError::UnknownVersion),
            ("llmgw:v3:a:b:c".into(), LlmgwError::UnknownVersion),
            ("sk-proj-abc".into(), LlmgwError::NotAToken),
            ("".into(), LlmgwError::NotAToken),
            ("LLMGW:v2:x".into(), LlmgwError::NotAToken),
        ];
        for (token, want) in cases {
            assert_eq!(open_err(&r, &token, &ROW), want, "{token}");
            let state = classify(&r, &token, &ROW);
            if want == LlmgwError::NotAToken {
                assert_eq!(state, State::Plaintext, "{token}");
            } else {
                assert_eq!(state, State::Unverified, "{token}");
            }
        }
        // unknown key id is reported before the parts are decoded (the gateway's order)
        let other = ring("other");
        assert!(matches!(
            open_err(&other, &with_part(&t, 3, "!"), &ROW),
            LlmgwError::UnknownKeyId(_)
        ));
    }

    #[test]
    fn decrypted_bytes_must_be_text() {
        let r = ring("s");
        for bad in [&b"\xff\xfe"[..], b"\xc3", b"nul\0inside"] {
            let iv = [7u8; IV_LEN];
            let mut buf = bad.to_vec();
            let tag = r
                .current()
                .cipher
                .encrypt_in_place_detached(Nonce::from_slice(&iv), &associated_data(&ROW), &mut buf)
                .unwrap();
            let t = format!(
                "llmgw:v2:{}:{}:{}:{}",
                r.current().kid(),
                B64URL.encode(iv),
                B64URL.encode(&buf),
                B64URL.encode(tag)
            );
            assert_eq!(open_err(&r, &t, &ROW), LlmgwError::NotText);
            assert_eq!(
                classify(&r, &t, &ROW),
                State::Current,
                "it does authenticate"
            );
        }
        let t = seal_v2(r.current(), "a\0b", &ROW).unwrap();
        assert_eq!(open_err(&r, &t, &ROW), LlmgwError::NotText);
    }

    #[test]
    fn size_limits() {
        let r = ring("s");
        let max = "a".repeat(MAX_PLAINTEXT_LEN);
        let t = seal_v2(r.current(), &max, &ROW).unwrap();
        assert_eq!(t.len(), MAX_TOKEN_LEN);
        assert_eq!(MAX_TOKEN_LEN, 87_440);
        assert_eq!(open(&r, &t, &ROW).unwrap().0.len(), MAX_PLAINTEXT_LEN);
        assert_eq!(
            seal_v2(r.current(), &format!("{max}a"), &ROW).err(),
            Some(LlmgwError::TooLong)
        );
        let mut long = t.clone();
        long.insert_str(30, "AAAA");
        assert_eq!(open_err(&r, &long, &ROW), LlmgwError::TooLong);
        assert_eq!(classify(&r, &long, &ROW), State::Unverified);
        // an over-long value that is not a token is still just a plaintext
        assert_eq!(
            classify(&r, &"x".repeat(MAX_TOKEN_LEN + 1), &ROW),
            State::Plaintext
        );
    }

    #[test]
    fn seal_uses_a_fresh_iv_every_time() {
        let r = ring("s");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2_000 {
            let t = seal_v2(r.current(), "sk-same", &ROW).unwrap();
            assert!(seen.insert(t.split(':').nth(3).unwrap().to_string()));
        }
    }

    #[test]
    fn base64url_decoding() {
        assert_eq!(decode_base64url("").unwrap(), b"");
        assert_eq!(decode_base64url("QUJD").unwrap(), b"ABC");
        assert_eq!(decode_base64url("-_-_").unwrap(), [0xfb, 0xff, 0xbf]);
        // unused trailing bits are ignored, as Node does ("QUI" and "QUJ" are both "AB")
        assert_eq!(decode_base64url("QUI").unwrap(), b"AB");
        assert_eq!(decode_base64url("QUJ").unwrap(), b"AB");
        for bad in [
            "Q", "QUJDR", "QUJ=", "QU JD", "QUJ+", "QUJ/", "QU\nJD", "QUJD==", "é",
        ] {
            assert_eq!(
                decode_base64url(bad),
                Err(LlmgwError::Malformed(Malformed::Base64)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn masks() {
        let b = |n: usize| MASK_BULLET.to_string().repeat(n);
        let cases: Vec<(String, String)> = vec![
            ("".into(), "".into()),
            ("a".into(), b(4)),
            ("ab".into(), b(4)),
            ("abc".into(), b(4)),
            ("abcd".into(), b(4)),
            ("abcde".into(), format!("a{}", b(4))),
            ("abcdef".into(), format!("ab{}", b(4))),
            ("abcdefghijklmnop".into(), format!("abcdefghijkl{}", b(4))),
            ("abcdefghijklmnopq".into(), format!("abcdefghijkl{}", b(5))),
            ("x".repeat(100), format!("{}{}", "x".repeat(12), b(5))),
            // non-BMP: 2 UTF-16 units each
            ("😀".into(), b(4)),
            ("😀😀😀".into(), format!("😀{}", b(4))),
            ("😀😀😀😀".into(), format!("😀😀{}", b(4))),
            // cut surrogate pairs: the kept high surrogate is stored as U+FFFD
            ("a😀bcd".into(), format!("a\u{FFFD}{}", b(4))),
            (
                "abcdefghijk😀xyzw".into(),
                format!("abcdefghijk\u{FFFD}{}", b(5)),
            ),
            ("abcdefghijkl😀xyzw".into(), format!("abcdefghijkl{}", b(5))),
            ("ünïcødé-中文-keys".into(), format!("ünïcødé-中文-{}", b(4))),
        ];
        for (pt, want) in cases {
            assert_eq!(mask(&pt), want, "{pt:?}");
        }
    }

    #[test]
    fn nothing_secret_in_debug_or_messages() {
        let r = ring("hunter2-secret, other-secret");
        let dbg = format!("{r:?} {:?}", r.current());
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("other-secret"),
            "{dbg}"
        );
        assert!(dbg.contains(&r.current().kid().to_string()));
        let t = seal_v2(r.current(), "sk-plaintext-value", &ROW).unwrap();
        let (pt, how) = open(&r, &t, &ROW).unwrap();
        assert!(!format!("{how:?}").contains("sk-plaintext"));
        drop(pt);
        for e in [
            LlmgwError::MissingSecret,
            LlmgwError::NotAToken,
            LlmgwError::UnknownVersion,
            LlmgwError::Malformed(Malformed::PartCount),
            LlmgwError::Malformed(Malformed::KeyId),
            LlmgwError::Malformed(Malformed::Base64),
            LlmgwError::Malformed(Malformed::IvLength),
            LlmgwError::Malformed(Malformed::TagLength),
            LlmgwError::UnknownKeyId(r.current().kid()),
            LlmgwError::DoesNotAuthenticate,
            LlmgwError::NotText,
            LlmgwError::TooLong,
            LlmgwError::NoRandomness,
        ] {
            let m = e.to_string();
            assert!(!m.contains("hunter2") && !m.contains("sk-"), "{m}");
        }
        assert!(LlmgwError::DoesNotAuthenticate
            .to_string()
            .contains("copied from another row or organization"));
    }
}
