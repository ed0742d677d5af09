//! Keys: parsing, the key ring (current key + previous keys for rotation), fingerprints.
//!
//! Pure Rust (no pgrx). Raw key bytes live only in `Zeroizing` buffers and are wiped when
//! dropped; the expanded AES/GHASH state is wiped by the `zeroize` features of `aes` and
//! `ghash` (see Cargo.toml). No error message or `Debug` output ever contains key material.

use aes_gcm::{Aes256Gcm, KeyInit};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::format_base64::{self as token, TokenError};

/// Name of the environment variable the gateway (and, by default, this extension) reads.
pub const ENV_VAR: &str = "ENCRYPTION_KEY";
/// Length of an AES-256 key.
pub const KEY_LEN: usize = 32;
/// The fixed label whose HMAC under the key is the fingerprint. Changing it changes every
/// fingerprint: the README's Node one-liner uses the same string.
pub const FINGERPRINT_LABEL: &[u8] = b"provider_keys_encrypt key fingerprint v1";

/// Where a key came from, for messages (never the value itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `provider_keys_encrypt.encryption_key`
    Setting,
    /// the server's `ENCRYPTION_KEY` environment variable
    Environment,
    /// entry N (1-based) of `provider_keys_encrypt.previous_keys`
    Previous(usize),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Setting => f.write_str("provider_keys_encrypt.encryption_key"),
            KeySource::Environment => f.write_str("ENCRYPTION_KEY"),
            KeySource::Previous(n) => write!(f, "provider_keys_encrypt.previous_keys (entry {n})"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no encryption key is configured: set provider_keys_encrypt.encryption_key or the \
         server's ENCRYPTION_KEY environment variable"
    )]
    Missing,
    #[error("{0} must be a 32-byte key, base64-encoded")]
    Invalid(KeySource),
}

/// Decode one base64 key (surrounding ASCII whitespace, such as the newline `openssl rand
/// -base64 32` prints, is ignored). The error never contains the input.
pub fn parse_key(b64: &str, source: KeySource) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let bytes = Zeroizing::new(
        STANDARD
            .decode(b64.trim_ascii().as_bytes())
            .map_err(|_| KeyError::Invalid(source))?,
    );
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if bytes.len() != KEY_LEN {
        return Err(KeyError::Invalid(source));
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// The non-secret fingerprint of a key: the first 8 bytes of HMAC-SHA-256(key, label), hex.
/// Same value as the README's Node one-liner computes from ENCRYPTION_KEY.
pub fn fingerprint(key: &[u8; KEY_LEN]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(FINGERPRINT_LABEL);
    let digest = mac.finalize().into_bytes();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Split the `previous_keys` setting into its entries (comma-separated, blanks ignored).
pub fn split_previous(csv: &str) -> impl Iterator<Item = &str> {
    csv.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// One usable key: its expanded cipher state and its fingerprint.
pub struct Key {
    cipher: Aes256Gcm,
    fingerprint: String,
}

impl Key {
    pub fn new(raw: &[u8; KEY_LEN]) -> Key {
        Key {
            cipher: Aes256Gcm::new(raw.into()),
            fingerprint: fingerprint(raw),
        }
    }
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// Which key a token authenticates under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// Not token-shaped: plaintext for certain.
    Plaintext,
    /// Authenticates under the current key.
    Current,
    /// Authenticates under a previous key (rotation pending).
    Previous,
    /// Token-shaped (canonical base64, ≥ 28 bytes) but authenticates under no configured key:
    /// a plaintext key that happens to look like base64, or a token under a key we lack.
    Unverified,
}

/// The configured keys: `keys[0]` is the current key, the rest are previous keys, tried in
/// order when decrypting.
pub struct KeyRing {
    keys: Vec<Key>,
    /// How the current key was configured (for SHOW and the run banner).
    source: KeySource,
}

impl KeyRing {
    /// Build the ring from the settings. `setting` wins over `env` when non-blank.
    pub fn from_config(
        setting: Option<&str>,
        env: Option<&str>,
        previous: Option<&str>,
    ) -> Result<KeyRing, KeyError> {
        let (value, source) = match (nonblank(setting), nonblank(env)) {
            (Some(v), _) => (v, KeySource::Setting),
            (None, Some(v)) => (v, KeySource::Environment),
            (None, None) => return Err(KeyError::Missing),
        };
        let current = parse_key(value, source)?;
        let mut keys = vec![Key::new(&current)];
        for (i, entry) in split_previous(previous.unwrap_or("")).enumerate() {
            let raw = parse_key(entry, KeySource::Previous(i + 1))?;
            let key = Key::new(&raw);
            // The current key listed again among previous keys changes nothing; skip it.
            if keys.iter().all(|k| k.fingerprint != key.fingerprint) {
                keys.push(key);
            }
        }
        Ok(KeyRing { keys, source })
    }

    pub fn current(&self) -> &Key {
        &self.keys[0]
    }
    pub fn previous(&self) -> &[Key] {
        &self.keys[1..]
    }
    pub fn source(&self) -> KeySource {
        self.source
    }

    /// Encrypt under the current key with a fresh OS nonce.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<String, TokenError> {
        token::seal(&self.current().cipher, plaintext)
    }

    /// Index of the key (0 = current) the decoded token authenticates under; on success
    /// `scratch` holds the plaintext bytes.
    fn open_raw(&self, raw: &[u8], scratch: &mut Vec<u8>) -> Option<usize> {
        self.keys
            .iter()
            .position(|k| token::open_raw(&k.cipher, raw, scratch))
    }

    /// Decrypt a token under the first key it authenticates under.
    pub fn decrypt(&self, token_text: &str) -> Result<Zeroizing<String>, TokenError> {
        let raw = token::decode(token_text)?;
        let mut scratch = Zeroizing::new(Vec::with_capacity(raw.len() - token::HEADER_LEN));
        match self.open_raw(&raw, &mut scratch) {
            Some(_) => token::into_text(std::mem::take(&mut *scratch)),
            None => Err(TokenError::Unauthenticated),
        }
    }

    /// Which configured key, if any, a value authenticates under. Never fails.
    pub fn classify(&self, value: &str) -> TokenState {
        let Ok(raw) = token::decode(value) else {
            return TokenState::Plaintext;
        };
        let mut scratch = Zeroizing::new(Vec::with_capacity(raw.len() - token::HEADER_LEN));
        match self.open_raw(&raw, &mut scratch) {
            Some(0) => TokenState::Current,
            Some(_) => TokenState::Previous,
            None => TokenState::Unverified,
        }
    }

    /// Re-encrypt a token under the current key (key rotation). The plaintext never leaves
    /// a zeroizing buffer; its bytes are re-sealed as they are (no UTF-8 round trip).
    pub fn reencrypt(&self, token_text: &str) -> Result<String, TokenError> {
        let raw = token::decode(token_text)?;
        let mut scratch = Zeroizing::new(Vec::with_capacity(raw.len() - token::HEADER_LEN));
        match self.open_raw(&raw, &mut scratch) {
            Some(_) => self.encrypt(&scratch),
            None => Err(TokenError::Unauthenticated),
        }
    }
}

fn nonblank(s: Option<&str>) -> Option<&str> {
    s.filter(|v| !v.trim_ascii().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "HxobGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgEAAAA=";

    fn ring(setting: Option<&str>, env: Option<&str>, prev: Option<&str>) -> KeyRing {
        KeyRing::from_config(setting, env, prev).unwrap()
    }

    #[test]
    fn key_must_be_32_bytes_of_standard_base64() {
        assert!(parse_key(K1, KeySource::Setting).is_ok());
        assert!(
            parse_key(&format!("{K1}\n"), KeySource::Setting).is_ok(),
            "openssl's newline"
        );
        let short = STANDARD.encode([1u8; 31]);
        let long = STANDARD.encode([1u8; 33]);
        for bad in [short.as_str(), long.as_str(), "not base64!", "", "AAEC"] {
            assert_eq!(
                parse_key(bad, KeySource::Environment).err(),
                Some(KeyError::Invalid(KeySource::Environment))
            );
        }
    }

    #[test]
    fn setting_wins_over_environment_and_missing_is_reported() {
        assert_eq!(ring(Some(K1), Some(K2), None).source(), KeySource::Setting);
        assert_eq!(
            ring(Some("  "), Some(K2), None).source(),
            KeySource::Environment
        );
        assert_eq!(
            KeyRing::from_config(None, Some(""), None).err(),
            Some(KeyError::Missing)
        );
        let err = KeyRing::from_config(None, None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("provider_keys_encrypt.encryption_key") && err.contains("ENCRYPTION_KEY")
        );
    }

    #[test]
    fn bad_previous_key_is_named_by_position_not_value() {
        let err = KeyRing::from_config(Some(K1), None, Some(&format!("{K2}, bogus")))
            .err()
            .unwrap();
        assert_eq!(err, KeyError::Invalid(KeySource::Previous(2)));
        let msg = err.to_string();
        assert!(msg.contains("entry 2") && !msg.contains("bogus"), "{msg}");
    }

    #[test]
    fn fingerprint_matches_node_hmac() {
        // node -e 'console.log(require("crypto").createHmac("sha256",
        //   Buffer.from(K1,"base64")).update("provider_keys_encrypt key fingerprint v1")
        //   .digest("hex").slice(0,16))'
        let raw = parse_key(K1, KeySource::Setting).unwrap();
        assert_eq!(
            fingerprint(&raw),
            include_str!("../../tests/interop/k1_fingerprint.txt").trim()
        );
        assert_ne!(
            fingerprint(&raw),
            fingerprint(&parse_key(K2, KeySource::Setting).unwrap())
        );
    }

    #[test]
    fn rotation_classify_decrypt_reencrypt() {
        let old = ring(Some(K2), None, None);
        let new = ring(Some(K1), None, Some(K2));
        let t_old = old.encrypt("sk-rotate-me".as_bytes()).unwrap();
        assert_eq!(new.classify(&t_old), TokenState::Previous);
        assert_eq!(new.decrypt(&t_old).unwrap().as_str(), "sk-rotate-me");
        let t_new = new.reencrypt(&t_old).unwrap();
        assert_eq!(new.classify(&t_new), TokenState::Current);
        assert_eq!(old.classify(&t_new), TokenState::Unverified);
        assert_eq!(new.decrypt(&t_new).unwrap().as_str(), "sk-rotate-me");
        assert_eq!(new.classify("sk-proj-plain"), TokenState::Plaintext);
        let hexkey = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(new.classify(hexkey), TokenState::Unverified);
        assert_eq!(new.decrypt(hexkey).err(), Some(TokenError::Unauthenticated));
    }

    #[test]
    fn current_key_repeated_in_previous_is_ignored() {
        let r = ring(Some(K1), None, Some(&format!("{K1},{K2},,")));
        assert_eq!(r.previous().len(), 1);
        assert_eq!(
            r.previous()[0].fingerprint(),
            ring(Some(K2), None, None).current().fingerprint()
        );
    }
}
