//! Any input to the token parser and the key ring: never panics, and the contract holds —
//! only what a configured key sealed authenticates, and every sealed value opens to itself.
#![no_main]

use provider_keys_encrypt_core::{format_base64 as token, keys};

use keys::{KeyRing, TokenState};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const CURRENT: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const PREVIOUS: &str = "HxobGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgEAAAA=";

fn ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| KeyRing::from_config(Some(CURRENT), None, Some(PREVIOUS)).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let ring = ring();
    // arbitrary bytes as a key setting: never panics, never accepted unless 32 bytes
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(k) = keys::parse_key(s, keys::KeySource::Setting) {
            assert_eq!(k.len(), 32);
        }
        // arbitrary text as a token: decode/classify/decrypt never panic, and agree
        let shaped = token::is_token_shaped(s);
        let state = ring.classify(s);
        match ring.decrypt(s) {
            Ok(_) => assert!(matches!(state, TokenState::Current | TokenState::Previous)),
            Err(token::TokenError::NotText) => {
                assert!(matches!(state, TokenState::Current | TokenState::Previous))
            }
            Err(token::TokenError::Unauthenticated) => assert_eq!(state, TokenState::Unverified),
            Err(token::TokenError::NotBase64 | token::TokenError::TooShort) => {
                assert!(!shaped);
                assert_eq!(state, TokenState::Plaintext);
            }
            Err(e) => panic!("unexpected error {e:?}"),
        }
        // and the round trip: what we seal opens to itself under the current key — except
        // text with a NUL byte, which PostgreSQL's text type cannot hold: decryption refuses it
        // (SQL can never pass one to encrypt_token)
        let t = ring.encrypt(s.as_bytes()).unwrap();
        assert_eq!(ring.classify(&t), TokenState::Current);
        match ring.decrypt(&t) {
            Ok(back) => assert_eq!(back.as_str(), s),
            Err(e) => {
                assert!(s.contains('\0'), "round trip failed: {e:?}");
                assert_eq!(e, token::TokenError::NotText);
            }
        }
    }
    // arbitrary bytes as a decoded token (nonce ‖ tag ‖ ciphertext): never authenticates
    if data.len() >= token::HEADER_LEN {
        use base64::Engine;
        let as_token = base64::engine::general_purpose::STANDARD.encode(data);
        assert_eq!(
            ring.classify(&as_token),
            TokenState::Unverified,
            "forged token authenticated"
        );
    }
});
