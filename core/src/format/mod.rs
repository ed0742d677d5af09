//! The two token formats, cut the same way.
//!
//! | format   | module     | where the token goes     | keys                                   | bound to |
//! |----------|------------|--------------------------|----------------------------------------|----------|
//! | `base64` | [`base64`] | `token`                  | `ENCRYPTION_KEY` (+ `ENCRYPTION_KEY_PREVIOUS`) | nothing  |
//! | `llmgw`  | [`llmgw`]  | `token_ciphertext` (+ `token_hash`, `token_masked`) | `GATEWAY_API_KEY_HASH_SECRET` | its row (id, organization) |
//!
//! Each module holds its codec (token parsing stays inside it) and one `Keyring`: the current
//! key first, then older keys. Both keyrings implement [`Keyring`], so that the engine, the
//! guard and the tests speak one vocabulary: [`State`] for what a stored value is, and
//! `classify` / `seal` / `open` / `reseal` of the same form. What a token is bound to is the
//! keyring's [`Keyring::Binding`]: `()` for base64, the row's [`crate::RowContext`] for llmgw.

use std::ffi::CStr;

use zeroize::Zeroizing;

pub mod base64;
pub mod llmgw;

/// A token format, as the procedures' `format => …` and the guard's `format=…` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The seed guide's: base64(nonce ‖ tag ‖ ciphertext) in `token`, key `ENCRYPTION_KEY`.
    Base64,
    /// The gateway's current: `llmgw:v2:…` in `token_ciphertext`, bound to the row, with
    /// `token_hash` and `token_masked`; keyring `GATEWAY_API_KEY_HASH_SECRET`.
    Llmgw,
}

impl Format {
    /// The name users type (`format => 'llmgw'`, `'format=llmgw'`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Base64 => "base64",
            Format::Llmgw => "llmgw",
        }
    }

    /// The format a name stands for.
    pub fn from_name(name: &str) -> Option<Format> {
        [Format::Base64, Format::Llmgw]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// What a stored value is under a keyring, in both formats. The engine, the report, the guard
/// and the messages use exactly these states; [`State::label`] is the SQL enum
/// `pke_internal.token_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A value to seal: base64, not token-shaped (or longer than any token); llmgw, a value
    /// without the `llmgw:` prefix.
    Plaintext,
    /// A token that opens under the current key (llmgw: a v2 token under the current secret).
    Current,
    /// A token that opens under an older key of the keyring (llmgw: or a v1 token): due for
    /// re-sealing.
    Previous,
    /// Looks like a token but opens under no key of the keyring: base64, canonical base64 of
    /// at least 28 bytes (a plaintext that looks like base64, or a token under a key we lack);
    /// llmgw, a value with the `llmgw:` prefix (never a plaintext to seal).
    Unverified,
}

impl State {
    /// Every state, in the order of the SQL enum's labels.
    pub const ALL: [State; 4] = [
        State::Plaintext,
        State::Current,
        State::Previous,
        State::Unverified,
    ];

    /// The label of the state in `pke_internal.token_state` (src/engine/types.sql).
    pub fn label(self) -> &'static CStr {
        match self {
            State::Plaintext => c"plaintext",
            State::Current => c"current_key",
            State::Previous => c"previous_key",
            State::Unverified => c"unverified",
        }
    }

    /// Does the value open under a key of the keyring?
    pub fn opens(self) -> bool {
        matches!(self, State::Current | State::Previous)
    }
}

/// A format's keyring: its keys, current first, and the four operations the engine and the
/// guard need, of the same form in both formats.
pub trait Keyring {
    /// What a token is bound to (its associated data): `()` for base64, the row for llmgw.
    type Binding<'a>: Copy;
    /// Why a value could not be sealed or opened. Fixed messages: never a key or a plaintext.
    type Error;

    /// Which [`State`] `value` is in. Never fails on odd input: the errors are out of memory
    /// (base64) and nothing else.
    fn classify(&self, value: &str, bound: Self::Binding<'_>) -> Result<State, Self::Error>;
    /// Seal `plaintext` under the current key, with a fresh nonce from the operating system.
    fn seal(&self, plaintext: &str, bound: Self::Binding<'_>) -> Result<String, Self::Error>;
    /// Open `token` under the first key it opens under: its plaintext, as text.
    fn open(&self, token: &str, bound: Self::Binding<'_>)
        -> Result<Zeroizing<String>, Self::Error>;
    /// Seal `token`'s plaintext again under the current key (rotation). The plaintext never
    /// leaves a wiping buffer.
    fn reseal(&self, token: &str, bound: Self::Binding<'_>) -> Result<String, Self::Error>;
}

#[cfg(test)]
mod tests {
    //! The shape both formats share, checked on both with the same code.
    use super::*;
    use crate::RowContext;

    /// Sealed under the current key, a value is `Current` and opens to itself; under an older
    /// key it is `Previous` and `reseal` makes it `Current`; a keyring without that key calls
    /// it `Unverified`; plaintext is `Plaintext`.
    fn the_shape<R: Keyring>(new: &R, old: &R, alone: &R, bound: R::Binding<'_>, plaintext: &str)
    where
        R::Error: std::fmt::Debug,
    {
        let t = new.seal(plaintext, bound).unwrap();
        assert_eq!(new.classify(&t, bound).unwrap(), State::Current);
        assert_eq!(new.open(&t, bound).unwrap().as_str(), plaintext);
        let t_old = old.seal(plaintext, bound).unwrap();
        assert_eq!(new.classify(&t_old, bound).unwrap(), State::Previous);
        let t_again = new.reseal(&t_old, bound).unwrap();
        assert_eq!(new.classify(&t_again, bound).unwrap(), State::Current);
        assert_eq!(new.open(&t_again, bound).unwrap().as_str(), plaintext);
        assert_eq!(alone.classify(&t, bound).unwrap(), State::Unverified);
        assert!(alone.open(&t, bound).is_err());
        assert_eq!(new.classify(plaintext, bound).unwrap(), State::Plaintext);
    }

    #[test]
    fn both_formats_have_one_shape() {
        const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        const K2: &str = "HxobGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgEAAAA=";
        const K3: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
        let b = |cur, prev| base64::Keyring::build(Some(cur), prev).unwrap();
        the_shape(
            &b(K1, Some(K2)),
            &b(K2, None),
            &b(K3, None),
            (),
            "sk-shape-1",
        );

        let l = |v: &str| llmgw::Keyring::parse(v).unwrap();
        let row = RowContext {
            id: "pk_1",
            organization_id: Some("org_1"),
        };
        the_shape(&l("new, old"), &l("old"), &l("other"), row, "sk-shape-2");
    }

    #[test]
    fn labels_and_names() {
        let labels: Vec<_> = State::ALL
            .iter()
            .map(|s| s.label().to_str().unwrap())
            .collect();
        assert_eq!(
            labels,
            ["plaintext", "current_key", "previous_key", "unverified"]
        );
        assert_eq!(Format::from_name("llmgw"), Some(Format::Llmgw));
        assert_eq!(Format::from_name("base64"), Some(Format::Base64));
        assert_eq!(Format::from_name("Base64"), None);
    }
}
