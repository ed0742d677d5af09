//! The keyrings, one cache for both formats: built on first use in a backend, after
//! [`settings::check_setup`] passed, from the key variables ([`settings::key_text`]: the
//! environment the server started with, or what `provider_keys_encrypt.key_command` printed),
//! and kept until those change (an error too). Dropping a ring wipes its keys.
//!
//! | format   | keyring                      | built from                                       |
//! |----------|------------------------------|--------------------------------------------------|
//! | `base64` | [`base64::Keyring`]          | `ENCRYPTION_KEY`, then `ENCRYPTION_KEY_PREVIOUS` |
//! | `llmgw`  | [`llmgw::Keyring`]           | `GATEWAY_API_KEY_HASH_SECRET`                    |
//!
//! A cached ring is used only while the settings' [`settings::epoch`] is the one it was built
//! in: the epoch moves when the key command's output changes (after a reload), and when the
//! settings' check hook finds a key where PostgreSQL put it before it could refuse it; every
//! ring then goes through the setup check again.

use std::cell::RefCell;
use std::rc::Rc;
use std::thread::LocalKey;

use provider_keys_encrypt_core::format::{base64, llmgw};

use crate::errors::Error;
use crate::settings::{self, KeyVar};

/// A format's keyring as this cache builds it.
pub trait Ring: Sized + 'static {
    /// Build the ring from the server's key variables.
    fn build() -> Result<Self, Error>;
    /// This ring's slot in the per-backend cache.
    fn slot() -> &'static LocalKey<Slot<Self>>;
}

/// A cached ring (or why it could not be built), with the epoch it was built in.
pub type Slot<R> = RefCell<Option<(u64, Result<Rc<R>, Error>)>>;

thread_local! {
    static BASE64: Slot<base64::Keyring> = const { RefCell::new(None) };
    static LLMGW: Slot<llmgw::Keyring> = const { RefCell::new(None) };
}

impl Ring for base64::Keyring {
    fn build() -> Result<Self, Error> {
        let current = settings::key_text(KeyVar::Current)?;
        let previous = settings::key_text(KeyVar::Previous)?;
        Ok(base64::Keyring::build(
            current.as_deref().map(String::as_str),
            previous.as_deref().map(String::as_str),
        )?)
    }
    fn slot() -> &'static LocalKey<Slot<Self>> {
        &BASE64
    }
}

impl Ring for llmgw::Keyring {
    fn build() -> Result<Self, Error> {
        let text = settings::key_text(KeyVar::Gateway)?.ok_or(llmgw::LlmgwError::MissingSecret)?;
        Ok(llmgw::Keyring::parse(&text)?)
    }
    fn slot() -> &'static LocalKey<Slot<Self>> {
        &LLMGW
    }
}

/// Run `f` with the keyring of type `R`, built on first use in this backend.
pub fn with_keyring<R: Ring, T>(f: impl FnOnce(&R) -> T) -> Result<T, Error> {
    // after a configuration reload, the key command's new keys (one comparison otherwise)
    crate::key_command::refresh();
    let epoch = settings::epoch();
    let cached = R::slot().with(|c| c.borrow().clone());
    if let Some((built_in, ring)) = cached {
        if built_in == epoch {
            return Ok(f(&*ring?));
        }
        // built in another epoch: drop it now (its keys are wiped), whatever the check says
        drop(ring);
        R::slot().with(|c| {
            if let Ok(mut slot) = c.try_borrow_mut() {
                *slot = None;
            }
        });
    }
    settings::check_setup()?;
    let ring = R::build().map(Rc::new);
    R::slot().with(|c| *c.borrow_mut() = Some((epoch, ring.clone())));
    Ok(f(&*ring?))
}
