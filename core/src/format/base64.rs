//! The guide's token format, `base64`: the contract with the gateway's Node.js code, and its
//! keyring (`ENCRYPTION_KEY`, then the `ENCRYPTION_KEY_PREVIOUS` keys).
//!
//! ```text
//! token = base64(STANDARD, padded)( nonce[12] ‖ tag[16] ‖ ciphertext )
//! cipher = AES-256-GCM, fresh random 96-bit nonce per token, no associated data
//! ```
//!
//! This module is pure Rust (no pgrx) so it is tested with plain `cargo test` and fuzzed
//! without a database. Nothing here ever formats a key or a plaintext into a message.
//!
//! # Bounded inputs
//!
//! Provider API keys are well under 1 KB, so sizes are capped far above any real use:
//! a plaintext is at most [`MAX_PLAINTEXT_LEN`] (64 KiB) bytes ([`Base64Error::TooLong`]), a
//! token at most [`MAX_TOKEN_LEN`] characters ([`Base64Error::TokenTooLong`]). Both checks
//! come before any allocation, and every allocation whose size depends on the input goes
//! through `try_reserve`: memory exhaustion is [`Base64Error::OutOfMemory`], never an abort
//! of the process (a PostgreSQL backend that aborts takes the whole cluster through crash
//! recovery).

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::engine::general_purpose::STANDARD;
use base64::{decoded_len_estimate, encoded_len, Engine};
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

use super::State;
use crate::keys::{
    fingerprint, parse_key, parse_key_list, scrub_stack, KeyError, KeySource, KEY_LEN,
};

/// Length of the GCM nonce (IV) at the start of every token.
pub const NONCE_LEN: usize = 12;
/// Length of the GCM authentication tag that follows the nonce.
pub const TAG_LEN: usize = 16;
/// Nonce and tag: the smallest possible token (an empty plaintext) decodes to this many bytes.
pub const HEADER_LEN: usize = NONCE_LEN + TAG_LEN;
/// The largest plaintext [`seal`] accepts, in bytes (64 KiB; provider API keys are < 1 KB).
pub const MAX_PLAINTEXT_LEN: usize = 64 * 1024;
/// The longest token [`decode`] accepts, in characters: the padded base64 length of a token
/// sealing [`MAX_PLAINTEXT_LEN`] bytes (87 420). A longer value is refused before any work.
pub const MAX_TOKEN_LEN: usize = (HEADER_LEN + MAX_PLAINTEXT_LEN).div_ceil(3) * 4;

/// Why a value could not be opened as a token. The messages are fixed strings: they never
/// carry the value, the key or a plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Base64Error {
    #[error("value is not an encrypted token: it is not canonical standard base64")]
    NotBase64,
    #[error("value is not an encrypted token: it decodes to fewer than 28 bytes")]
    TooShort,
    #[error("token does not authenticate under any configured key")]
    Unauthenticated,
    #[error("decrypted token is not valid UTF-8 text")]
    NotText,
    /// The plaintext is longer than [`MAX_PLAINTEXT_LEN`].
    #[error("value is too long to encrypt: the limit is 65536 bytes")]
    TooLong,
    #[error("could not obtain random bytes from the operating system")]
    NoRandomness,
    /// The value is longer than [`MAX_TOKEN_LEN`] characters, or decodes to a ciphertext
    /// longer than [`MAX_PLAINTEXT_LEN`]: not a token this extension or the gateway writes
    /// for an API key.
    #[error("value is too long to be an encrypted token: the limit is 87420 characters")]
    TokenTooLong,
    /// A buffer sized by the input could not be allocated.
    #[error("out of memory")]
    OutOfMemory,
}

/// An empty vector with room for exactly `len` bytes, or [`Base64Error::OutOfMemory`].
fn try_vec(len: usize) -> Result<Vec<u8>, Base64Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| Base64Error::OutOfMemory)?;
    Ok(v)
}

/// A zeroizing buffer with room for the plaintext of the decoded token `raw` (which
/// [`decode`] bounded), to pass to [`open_raw`].
pub fn plaintext_buffer(raw: &[u8]) -> Result<Zeroizing<Vec<u8>>, Base64Error> {
    try_vec(raw.len().saturating_sub(HEADER_LEN)).map(Zeroizing::new)
}

/// Encrypt `plaintext` under `cipher` with a fresh nonce from the operating system's CSPRNG.
///
/// The nonce comes from `getrandom(2)` on every call, never from a user-space generator whose
/// state a `fork()` of the postmaster could duplicate into two backends.
pub fn seal(cipher: &Aes256Gcm, plaintext: &[u8]) -> Result<String, Base64Error> {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|_| Base64Error::NoRandomness)?;
    seal_with_nonce(cipher, &nonce, plaintext)
}

/// Encrypt with a caller-chosen nonce. Deterministic: used by [`seal`] and by the test vectors.
/// Never reuse a nonce with the same key outside tests.
pub fn seal_with_nonce(
    cipher: &Aes256Gcm,
    nonce: &[u8; NONCE_LEN],
    plaintext: &[u8],
) -> Result<String, Base64Error> {
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(Base64Error::TooLong);
    }
    // One buffer laid out as the token: nonce ‖ tag ‖ text, encrypted in place, so the
    // plaintext is never copied anywhere else (the exact capacity is reserved: no
    // reallocation leaves a copy behind; the buffer is wiped in case encryption fails).
    let mut raw = Zeroizing::new(try_vec(HEADER_LEN + plaintext.len())?);
    raw.extend_from_slice(nonce);
    raw.extend_from_slice(&[0u8; TAG_LEN]);
    raw.extend_from_slice(plaintext);
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(nonce), b"", &mut raw[HEADER_LEN..])
        .map_err(|_| Base64Error::TooLong)?;
    raw[NONCE_LEN..HEADER_LEN].copy_from_slice(&tag);
    let len = encoded_len(raw.len(), true).ok_or(Base64Error::TooLong)?;
    // base64 written in place into a buffer of the exact length (no String push: a memcpy call,
    // which musl makes costly for small sizes).
    let mut token = Vec::new();
    token
        .try_reserve_exact(len)
        .map_err(|_| Base64Error::OutOfMemory)?;
    token.resize(len, 0);
    let n = STANDARD
        .encode_slice(&*raw, &mut token)
        .expect("the buffer is sized for the encoding");
    debug_assert_eq!(n, len);
    Ok(String::from_utf8(token).expect("base64 is ASCII"))
}

/// Decode a token's base64 without checking its authenticity: canonical, padded standard
/// base64 of at least [`HEADER_LEN`] bytes and at most [`MAX_TOKEN_LEN`] characters, whose
/// ciphertext is at most [`MAX_PLAINTEXT_LEN`] bytes.
pub fn decode(token: &str) -> Result<Vec<u8>, Base64Error> {
    // The length is known before anything is read or allocated.
    if token.len() > MAX_TOKEN_LEN {
        return Err(Base64Error::TokenTooLong);
    }
    // Canonical padded base64 always has a length that is a multiple of four; this rejects
    // most plaintext API keys before any decoding work.
    if token.len() % 4 != 0 {
        return Err(Base64Error::NotBase64);
    }
    let mut raw = try_vec(decoded_len_estimate(token.len()))?;
    raw.resize(raw.capacity(), 0);
    let n = STANDARD
        .decode_slice(token.as_bytes(), &mut raw)
        .map_err(|_| Base64Error::NotBase64)?;
    raw.truncate(n);
    if raw.len() < HEADER_LEN {
        return Err(Base64Error::TooShort);
    }
    // MAX_TOKEN_LEN rounds up to whole base64 groups: one more byte can fit.
    if raw.len() - HEADER_LEN > MAX_PLAINTEXT_LEN {
        return Err(Base64Error::TokenTooLong);
    }
    Ok(raw)
}

/// The key-less shape test: canonical standard base64 of at least 28 bytes. Many real API
/// keys pass it (64 hex characters, 40 alphanumerics, …), so it never decides on its own
/// whether a value is encrypted.
pub fn is_token_shaped(token: &str) -> bool {
    decode(token).is_ok()
}

/// Try to open decoded token bytes under one key: `Ok(true)` when they authenticate, and then
/// `scratch` holds the plaintext.
///
/// `scratch` is reused across keys and rows; the caller wipes it (it may hold plaintext).
/// Give it the capacity the ciphertext needs ([`plaintext_buffer`]); if it is too small, its
/// old contents are wiped before it is replaced (a reallocation would leave them behind), and
/// the only possible error is [`Base64Error::OutOfMemory`]. A token whose tag does not verify
/// is never decrypted: `scratch` then holds ciphertext.
pub fn open_raw(
    cipher: &Aes256Gcm,
    raw: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<bool, Base64Error> {
    if raw.len() < HEADER_LEN {
        return Ok(false);
    }
    let (nonce, rest) = raw.split_at(NONCE_LEN);
    let (tag, ciphertext) = rest.split_at(TAG_LEN);
    if scratch.capacity() < ciphertext.len() {
        scratch.zeroize();
        *scratch = try_vec(ciphertext.len())?;
    }
    scratch.clear();
    scratch.extend_from_slice(ciphertext);
    Ok(cipher
        .decrypt_in_place_detached(Nonce::from_slice(nonce), b"", scratch, Tag::from_slice(tag))
        .is_ok())
}

/// Turn decrypted bytes into text PostgreSQL can store: valid UTF-8 without NUL bytes.
/// Invalid bytes are wiped before the error is returned.
pub fn into_text(bytes: Vec<u8>) -> Result<Zeroizing<String>, Base64Error> {
    if bytes.contains(&0) {
        drop(Zeroizing::new(bytes));
        return Err(Base64Error::NotText);
    }
    match String::from_utf8(bytes) {
        Ok(s) => Ok(Zeroizing::new(s)),
        Err(e) => {
            drop(Zeroizing::new(e.into_bytes()));
            Err(Base64Error::NotText)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The keyring: ENCRYPTION_KEY, then the ENCRYPTION_KEY_PREVIOUS keys.

/// One usable key: its expanded cipher state and its fingerprint.
pub struct Key {
    cipher: Box<Aes256Gcm>,
    fingerprint: String,
}

impl Key {
    pub fn new(raw: &[u8; KEY_LEN]) -> Key {
        let cipher = expand(raw);
        scrub_stack();
        Key {
            cipher,
            fingerprint: fingerprint(raw),
        }
    }
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

#[inline(never)]
fn expand(raw: &[u8; KEY_LEN]) -> Box<Aes256Gcm> {
    Box::new(Aes256Gcm::new(raw.into()))
}

/// The configured keys: `keys[0]` is the current key, the rest are previous keys, tried in
/// order when opening.
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    /// Build the ring from `ENCRYPTION_KEY` (`current`; blank or `None`:
    /// [`KeyError::Missing`]) and `ENCRYPTION_KEY_PREVIOUS` (`previous`, comma-separated, in
    /// order). A key equal to one already in the ring is skipped. Every entry must parse: the
    /// first that does not is the error, named by its position, never by its value.
    pub fn build(current: Option<&str>, previous: Option<&str>) -> Result<Keyring, KeyError> {
        let current = current
            .filter(|v| !v.trim_ascii().is_empty())
            .ok_or(KeyError::Missing)?;
        let current = parse_key(current, KeySource::Environment)?;
        let mut keys = vec![Key::new(&current)];
        for raw in parse_key_list(previous.unwrap_or(""), KeySource::EnvironmentPrevious) {
            let key = Key::new(&*raw?);
            // A key listed again (or the current key among the previous ones) changes
            // nothing; skip it.
            if keys.iter().all(|k| k.fingerprint != key.fingerprint) {
                keys.push(key);
            }
        }
        Ok(Keyring { keys })
    }

    pub fn current(&self) -> &Key {
        &self.keys[0]
    }

    /// Seal bytes under the current key with a fresh OS nonce. The guard seals a row's token
    /// bytes as they are; [`super::Keyring::seal`] is this for text.
    pub fn seal_bytes(&self, plaintext: &[u8]) -> Result<String, Base64Error> {
        seal(&self.current().cipher, plaintext)
    }

    pub fn previous(&self) -> &[Key] {
        &self.keys[1..]
    }

    /// Index of the key (0 = current) the decoded token authenticates under; on success
    /// `scratch` holds the plaintext bytes.
    fn open_raw(&self, raw: &[u8], scratch: &mut Vec<u8>) -> Result<Option<usize>, Base64Error> {
        for (i, key) in self.keys.iter().enumerate() {
            if open_raw(&key.cipher, raw, scratch)? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// The configured key a value authenticates under, if any (its fingerprint is public: the
    /// report shows it). Errors as [`Keyring::classify`](super::Keyring::classify).
    pub fn authenticating_key(&self, value: &str) -> Result<Option<&Key>, Base64Error> {
        let raw = match decode(value) {
            Ok(raw) => raw,
            Err(Base64Error::OutOfMemory) => return Err(Base64Error::OutOfMemory),
            Err(_) => return Ok(None),
        };
        let mut scratch = plaintext_buffer(&raw)?;
        Ok(self.open_raw(&raw, &mut scratch)?.map(|i| &self.keys[i]))
    }
}

/// A base64 token is bound to nothing: `Binding` is `()`.
impl super::Keyring for Keyring {
    type Binding<'a> = ();
    type Error = Base64Error;

    /// Which configured key, if any, a value authenticates under. Never fails on odd input:
    /// the only error is [`Base64Error::OutOfMemory`] (a buffer for the ciphertext of a
    /// token-shaped value, at most [`MAX_PLAINTEXT_LEN`] bytes, could not be had).
    fn classify(&self, value: &str, (): ()) -> Result<State, Base64Error> {
        let raw = match decode(value) {
            Ok(raw) => raw,
            Err(Base64Error::OutOfMemory) => return Err(Base64Error::OutOfMemory),
            Err(_) => return Ok(State::Plaintext),
        };
        let mut scratch = plaintext_buffer(&raw)?;
        Ok(match self.open_raw(&raw, &mut scratch)? {
            Some(0) => State::Current,
            Some(_) => State::Previous,
            None => State::Unverified,
        })
    }

    /// Seal under the current key with a fresh OS nonce.
    fn seal(&self, plaintext: &str, (): ()) -> Result<String, Base64Error> {
        self.seal_bytes(plaintext.as_bytes())
    }

    /// Open a token under the first key it authenticates under.
    fn open(&self, token: &str, (): ()) -> Result<Zeroizing<String>, Base64Error> {
        let raw = decode(token)?;
        let mut scratch = plaintext_buffer(&raw)?;
        match self.open_raw(&raw, &mut scratch)? {
            Some(_) => into_text(std::mem::take(&mut *scratch)),
            None => Err(Base64Error::Unauthenticated),
        }
    }

    /// Re-seal a token under the current key (key rotation). Its bytes are re-sealed as they
    /// are (no UTF-8 round trip).
    fn reseal(&self, token: &str, (): ()) -> Result<String, Base64Error> {
        let raw = decode(token)?;
        let mut scratch = plaintext_buffer(&raw)?;
        match self.open_raw(&raw, &mut scratch)? {
            Some(_) => self.seal_bytes(&scratch),
            None => Err(Base64Error::Unauthenticated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::KeyInit;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Open a token under one key (the keyring tries every configured key).
    fn open(cipher: &Aes256Gcm, token: &str) -> Result<Zeroizing<String>, Base64Error> {
        let raw = decode(token)?;
        let mut scratch = plaintext_buffer(&raw)?;
        if !open_raw(cipher, &raw, &mut scratch)? {
            return Err(Base64Error::Unauthenticated);
        }
        into_text(std::mem::take(&mut *scratch))
    }

    fn cipher(key: &[u8]) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(key).unwrap()
    }

    /// McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 13–15 (AES-256,
    /// no associated data): checks the primitive itself and our nonce ‖ tag ‖ ct layout.
    #[test]
    fn gcm_spec_known_answer_vectors() {
        struct Case {
            key: &'static str,
            iv: &'static str,
            pt: &'static str,
            ct: &'static str,
            tag: &'static str,
        }
        let cases = [
            Case {
                key: "0000000000000000000000000000000000000000000000000000000000000000",
                iv: "000000000000000000000000",
                pt: "",
                ct: "",
                tag: "530f8afbc74536b9a963b4f1c4cb738b",
            },
            Case {
                key: "0000000000000000000000000000000000000000000000000000000000000000",
                iv: "000000000000000000000000",
                pt: "00000000000000000000000000000000",
                ct: "cea7403d4d606b6e074ec5d3baf39d18",
                tag: "d0d1c8a799996bf0265b98b5d48ab919",
            },
            Case {
                key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
                iv: "cafebabefacedbaddecaf888",
                pt: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72
                     1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
                ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa
                     8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
                tag: "b094dac5d93471bdec1a502270e3cc6c",
            },
        ];
        for c in cases {
            let nonce: [u8; 12] = hex(c.iv).try_into().unwrap();
            let token = seal_with_nonce(&cipher(&hex(c.key)), &nonce, &hex(c.pt)).unwrap();
            let raw = STANDARD.decode(token).unwrap();
            assert_eq!(&raw[..12], &nonce[..], "nonce first");
            assert_eq!(&raw[12..28], &hex(c.tag)[..], "then the tag");
            assert_eq!(&raw[28..], &hex(c.ct)[..], "then the ciphertext");
            let mut scratch = Vec::new();
            assert!(open_raw(&cipher(&hex(c.key)), &raw, &mut scratch).unwrap());
            assert_eq!(scratch, hex(c.pt));
        }
    }

    /// Tokens produced by Node's `node:crypto` (createCipheriv('aes-256-gcm', key, iv),
    /// Buffer.concat([iv, cipher.getAuthTag(), encrypted]).toString('base64')) with fixed
    /// inputs; generated by tests/interop/make_vectors.mjs.
    const NODE_KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const NODE_VECTORS: &[(&str, &str, &str)] =
        include!("../../../tests/interop/node_vectors.rs.in");

    #[test]
    fn node_generated_vectors_round_trip_exactly() {
        let key = STANDARD.decode(NODE_KEY_B64).unwrap();
        let c = cipher(&key);
        assert!(NODE_VECTORS.len() >= 4);
        for (iv_hex, plaintext, node_token) in NODE_VECTORS {
            let nonce: [u8; 12] = hex(iv_hex).try_into().unwrap();
            let ours = seal_with_nonce(&c, &nonce, plaintext.as_bytes()).unwrap();
            assert_eq!(&ours, node_token, "same bytes as Node for {plaintext:?}");
            assert_eq!(open(&c, node_token).unwrap().as_str(), *plaintext);
        }
    }

    #[test]
    fn seal_uses_a_fresh_nonce_every_time() {
        let c = cipher(&[7u8; 32]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let raw = STANDARD.decode(seal(&c, b"sk-same").unwrap()).unwrap();
            assert!(seen.insert(raw[..NONCE_LEN].to_vec()), "nonce repeated");
        }
    }

    #[test]
    fn decode_rejects_what_is_not_a_token() {
        assert_eq!(
            decode(""),
            Err(Base64Error::TooShort),
            "empty is valid base64 of 0 bytes"
        );
        assert_eq!(decode("sk-proj-abc"), Err(Base64Error::NotBase64));
        // valid base64 but too short: 27 bytes
        assert_eq!(
            decode(&STANDARD.encode([1u8; 27])),
            Err(Base64Error::TooShort)
        );
        assert!(decode(&STANDARD.encode([1u8; 28])).is_ok());
        // missing padding, URL-safe alphabet, whitespace, non-canonical trailing bits
        let good = STANDARD.encode([0xfbu8; 29]);
        assert!(good.ends_with('='));
        assert_eq!(
            decode(good.trim_end_matches('=')),
            Err(Base64Error::NotBase64)
        );
        assert_eq!(decode(&good.replace('+', "-")), Err(Base64Error::NotBase64));
        assert_eq!(
            decode(&format!(" {good}")[..good.len()]),
            Err(Base64Error::NotBase64)
        );
        let mut noncanonical = good.clone().into_bytes();
        // with one "=", the last character before it has 2 unused low bits: set one of them
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let i = noncanonical.len() - 2;
        let v = ALPHABET.iter().position(|&c| c == noncanonical[i]).unwrap();
        noncanonical[i] = ALPHABET[v ^ 1];
        assert_eq!(
            decode(std::str::from_utf8(&noncanonical).unwrap()),
            Err(Base64Error::NotBase64)
        );
    }

    #[test]
    fn shape_test_accepts_real_looking_plaintext_keys() {
        // Why the shape test can't decide: 64 hex chars is canonical base64 of 48 bytes.
        let hex_key = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert!(is_token_shaped(hex_key));
        // ... but it does not authenticate.
        assert_eq!(
            open(&cipher(&[1u8; 32]), hex_key),
            Err(Base64Error::Unauthenticated)
        );
        assert!(!is_token_shaped(
            "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789"
        ));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let c = cipher(&[9u8; 32]);
        let token = seal(&c, "sk-ünïcødé-✓".as_bytes()).unwrap();
        let raw = STANDARD.decode(&token).unwrap();
        let mut scratch = Vec::new();
        for byte in 0..raw.len() {
            for bit in 0..8 {
                let mut bad = raw.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    !open_raw(&c, &bad, &mut scratch).unwrap(),
                    "flip at {byte}.{bit}"
                );
            }
        }
        assert!(open_raw(&c, &raw, &mut scratch).unwrap());
    }

    #[test]
    fn wrong_key_does_not_authenticate() {
        let token = seal(&cipher(&[1u8; 32]), b"secret").unwrap();
        assert_eq!(
            open(&cipher(&[2u8; 32]), &token),
            Err(Base64Error::Unauthenticated)
        );
    }

    #[test]
    fn decrypted_bytes_must_be_text() {
        let c = cipher(&[3u8; 32]);
        for bad in [&b"\xff\xfe"[..], b"nul\0inside", b"\xc3"] {
            let token = seal(&c, bad).unwrap();
            assert_eq!(open(&c, &token), Err(Base64Error::NotText));
        }
        let token = seal(&c, b"").unwrap();
        assert_eq!(open(&c, &token).unwrap().as_str(), "");
        assert_eq!(STANDARD.decode(&token).unwrap().len(), HEADER_LEN);
    }

    #[test]
    fn error_messages_carry_no_input() {
        for e in [
            Base64Error::NotBase64,
            Base64Error::TooShort,
            Base64Error::Unauthenticated,
            Base64Error::NotText,
            Base64Error::TooLong,
            Base64Error::NoRandomness,
            Base64Error::TokenTooLong,
            Base64Error::OutOfMemory,
        ] {
            let m = e.to_string();
            assert!(!m.contains('{') && !m.contains("sk-"), "{m}");
        }
        // the limits the messages quote are the real ones
        assert!(Base64Error::TooLong
            .to_string()
            .contains(&MAX_PLAINTEXT_LEN.to_string()));
        assert!(Base64Error::TokenTooLong
            .to_string()
            .contains(&MAX_TOKEN_LEN.to_string()));
    }

    #[test]
    fn plaintext_limit_is_exact_and_checked_first() {
        assert_eq!(MAX_PLAINTEXT_LEN, 65_536);
        let c = cipher(&[4u8; 32]);
        let at_limit = vec![b'k'; MAX_PLAINTEXT_LEN];
        let token = seal(&c, &at_limit).unwrap();
        assert_eq!(open(&c, &token).unwrap().len(), MAX_PLAINTEXT_LEN);
        assert_eq!(
            seal(&c, &vec![b'k'; MAX_PLAINTEXT_LEN + 1]),
            Err(Base64Error::TooLong)
        );
    }

    #[test]
    fn token_limit_matches_the_largest_sealed_plaintext() {
        assert_eq!(MAX_TOKEN_LEN, 87_420);
        let c = cipher(&[5u8; 32]);
        let token = seal(&c, &vec![b'k'; MAX_PLAINTEXT_LEN]).unwrap();
        assert_eq!(token.len(), MAX_TOKEN_LEN, "the largest token fits exactly");
        assert!(decode(&token).is_ok());
        // one character more: refused on length alone, even though it is not base64
        let longer = "!".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(decode(&longer), Err(Base64Error::TokenTooLong));
        assert_eq!(
            decode(&"A".repeat(MAX_TOKEN_LEN + 4)),
            Err(Base64Error::TokenTooLong)
        );
        assert!(!is_token_shaped(&longer));
        // within the character limit, but the ciphertext is one byte over (the limit rounds
        // up to whole base64 groups)
        let over = STANDARD.encode(vec![1u8; HEADER_LEN + MAX_PLAINTEXT_LEN + 1]);
        assert_eq!(over.len(), MAX_TOKEN_LEN);
        assert_eq!(decode(&over), Err(Base64Error::TokenTooLong));
    }

    #[test]
    fn open_raw_replaces_a_small_scratch_and_refuses_short_input() {
        let c = cipher(&[6u8; 32]);
        let raw = STANDARD
            .decode(seal(&c, b"sk-0123456789").unwrap())
            .unwrap();
        let mut scratch = Vec::new();
        assert!(open_raw(&c, &raw, &mut scratch).unwrap());
        assert_eq!(scratch, b"sk-0123456789");
        let mut exact = plaintext_buffer(&raw).unwrap();
        assert_eq!(exact.capacity(), raw.len() - HEADER_LEN);
        assert!(open_raw(&c, &raw, &mut exact).unwrap());
        assert_eq!(exact.capacity(), raw.len() - HEADER_LEN, "no reallocation");
        assert!(!open_raw(&c, &raw[..HEADER_LEN - 1], &mut scratch).unwrap());
    }

    // ---- the keyring -------------------------------------------------------------------

    use crate::format::Keyring as _;
    use base64::engine::general_purpose::STANDARD;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "HxobGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgEAAAA=";

    fn ring(current: &str, previous: Option<&str>) -> Keyring {
        Keyring::build(Some(current), previous).unwrap()
    }

    #[test]
    fn a_missing_current_key_is_reported() {
        for blank in [None, Some(""), Some("  \t")] {
            assert_eq!(
                Keyring::build(blank, Some(K2)).err(),
                Some(KeyError::Missing)
            );
        }
        let err = Keyring::build(None, None).err().unwrap().to_string();
        assert!(
            err.contains("ENCRYPTION_KEY") && err.contains("environment"),
            "{err}"
        );
    }

    #[test]
    fn previous_keys_in_order_blanks_ignored_duplicates_skipped() {
        let k3 = STANDARD.encode([3u8; 32]);
        // blanks ignored, URL-safe / unpadded / CRLF accepted, duplicates skipped
        let r = ring(
            K1,
            Some(&format!(
                " ,{K2},{},\r\n{K2}, {K1} ,,",
                k3.trim_end_matches('=')
            )),
        );
        let fps: Vec<&str> = r.previous().iter().map(Key::fingerprint).collect();
        assert_eq!(
            fps,
            [
                fingerprint(&parse_key(K2, KeySource::Environment).unwrap()),
                fingerprint(&[3u8; 32])
            ]
        );
        // an old token under a key given only in ENCRYPTION_KEY_PREVIOUS opens
        let t = ring(&k3, None).seal("sk-env-prev", ()).unwrap();
        assert_eq!(r.classify(&t, ()), Ok(State::Previous));
        assert_eq!(r.open(&t, ()).unwrap().as_str(), "sk-env-prev");
    }

    #[test]
    fn a_bad_previous_key_is_named_by_position_not_value() {
        // positions count non-blank entries only
        let err = Keyring::build(Some(K1), Some(&format!(",{K2},, sk-not-a-key ")))
            .err()
            .unwrap();
        assert_eq!(err, KeyError::Invalid(KeySource::EnvironmentPrevious(2)));
        assert_eq!(
            err.to_string(),
            "ENCRYPTION_KEY_PREVIOUS (entry 2) must be a 32-byte key, base64-encoded"
        );
        let errs: Vec<_> = parse_key_list(&format!("{K1},x"), KeySource::EnvironmentPrevious)
            .map(|r| r.err())
            .collect();
        assert_eq!(
            errs,
            [
                None,
                Some(KeyError::Invalid(KeySource::EnvironmentPrevious(2)))
            ]
        );
    }

    #[test]
    fn rotation_classify_open_reseal() {
        let old = ring(K2, None);
        let new = ring(K1, Some(K2));
        let t_old = old.seal("sk-rotate-me", ()).unwrap();
        assert_eq!(new.classify(&t_old, ()), Ok(State::Previous));
        assert_eq!(new.open(&t_old, ()).unwrap().as_str(), "sk-rotate-me");
        let t_new = new.reseal(&t_old, ()).unwrap();
        assert_eq!(new.classify(&t_new, ()), Ok(State::Current));
        assert_eq!(old.classify(&t_new, ()), Ok(State::Unverified));
        assert_eq!(new.open(&t_new, ()).unwrap().as_str(), "sk-rotate-me");
        assert_eq!(new.classify("sk-proj-plain", ()), Ok(State::Plaintext));
        let hexkey = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(new.classify(hexkey, ()), Ok(State::Unverified));
        assert_eq!(
            new.open(hexkey, ()).err(),
            Some(Base64Error::Unauthenticated)
        );
        // longer than any token: plaintext for classify, an error for open and reseal
        let huge = "A".repeat(MAX_TOKEN_LEN + 4);
        assert_eq!(new.classify(&huge, ()), Ok(State::Plaintext));
        assert_eq!(new.open(&huge, ()).err(), Some(Base64Error::TokenTooLong));
        assert_eq!(new.reseal(&huge, ()).err(), Some(Base64Error::TokenTooLong));
        // bytes that are not UTF-8 are sealed and re-sealed as they are
        let raw = new.seal_bytes(b"\xff\xfe").unwrap();
        assert_eq!(new.classify(&raw, ()), Ok(State::Current));
        assert_eq!(new.open(&raw, ()).err(), Some(Base64Error::NotText));
        let again = new.reseal(&raw, ()).unwrap();
        let (bytes, n) = (decode(&again).unwrap(), HEADER_LEN);
        assert_eq!(bytes.len(), n + 2);
    }

    #[test]
    fn the_current_key_repeated_in_previous_is_ignored() {
        let r = ring(K1, Some(&format!("{K1},{K2},,")));
        assert_eq!(r.previous().len(), 1);
        assert_eq!(
            r.previous()[0].fingerprint(),
            ring(K2, None).current().fingerprint()
        );
    }

    #[test]
    fn authenticating_key_names_the_key_a_token_opens_under() {
        let old = ring(K2, None);
        let r = ring(K1, Some(K2));
        let t_new = r.seal("sk-new", ()).unwrap();
        let t_old = old.seal("sk-old", ()).unwrap();
        let fp = |t: &str| {
            r.authenticating_key(t)
                .unwrap()
                .map(|k| k.fingerprint().to_owned())
        };
        assert_eq!(fp(&t_new).as_deref(), Some(r.current().fingerprint()));
        assert_eq!(fp(&t_old).as_deref(), Some(r.previous()[0].fingerprint()));
        assert_eq!(fp("sk-plain"), None);
        let t_other = ring(&STANDARD.encode([7u8; 32]), None)
            .seal("x", ())
            .unwrap();
        assert_eq!(fp(&t_other), None);
    }
}
