//! Any input to the token parser and the key ring: never panics, and the contract holds —
//! only what a configured key sealed authenticates, and every sealed value opens to itself.
#![no_main]

use provider_keys_encrypt_core::format::base64::{self as token, Base64Error, Keyring};
use provider_keys_encrypt_core::format::{Keyring as _, State};
use provider_keys_encrypt_core::keys;

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const CURRENT: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const PREVIOUS: &str = "HxobGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgEAAAA=";

fn ring() -> &'static Keyring {
    static RING: OnceLock<Keyring> = OnceLock::new();
    RING.get_or_init(|| Keyring::build(Some(CURRENT), Some(PREVIOUS)).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let ring = ring();
    // arbitrary bytes as a key variable: never panics, never accepted unless 32 bytes
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(k) = keys::parse_key(s, keys::KeySource::Environment) {
            assert_eq!(k.len(), 32);
        }
        // arbitrary text as a token: decode/classify/open never panic, and agree
        let shaped = token::is_token_shaped(s);
        let state = ring.classify(s, ()).unwrap();
        match ring.open(s, ()) {
            Ok(_) => assert!(state.opens()),
            Err(Base64Error::NotText) => assert!(state.opens()),
            Err(Base64Error::Unauthenticated) => assert_eq!(state, State::Unverified),
            Err(Base64Error::NotBase64 | Base64Error::TooShort) => {
                assert!(!shaped);
                assert_eq!(state, State::Plaintext);
            }
            Err(e) => panic!("unexpected error {e:?}"),
        }
        // and the round trip: what we seal opens to itself under the current key — except
        // text with a NUL byte, which PostgreSQL's text type cannot hold: opening refuses it
        // (SQL can never pass one to encrypt_token)
        let t = ring.seal(s, ()).unwrap();
        assert_eq!(ring.classify(&t, ()).unwrap(), State::Current);
        match ring.open(&t, ()) {
            Ok(back) => assert_eq!(back.as_str(), s),
            Err(e) => {
                assert!(s.contains('\0'), "round trip failed: {e:?}");
                assert_eq!(e, Base64Error::NotText);
            }
        }
    }
    // arbitrary bytes as a decoded token (nonce ‖ tag ‖ ciphertext): never authenticates
    if data.len() >= token::HEADER_LEN {
        use base64::Engine;
        let as_token = base64::engine::general_purpose::STANDARD.encode(data);
        assert_eq!(
            ring.classify(&as_token, ()).unwrap(),
            State::Unverified,
            "forged token authenticated"
        );
    }
});
