//! Settings (GUCs) and the cached key ring built from them.
//!
//! * `provider_keys_encrypt.encryption_key` — base64 of the 32-byte key. When blank (the
//!   default), the key comes from the server process's `ENCRYPTION_KEY` environment variable,
//!   read at first use. The boot value stays empty, so the key never shows up in
//!   `pg_settings.boot_val`.
//! * `provider_keys_encrypt.previous_keys` — comma-separated base64 keys, for decryption only.
//!
//! Secrecy (see README "Security"): both are `SUSET` (only superusers, or roles a superuser
//! granted `SET` on them, may change them), `SUPERUSER_ONLY` and `NO_SHOW_ALL` (absent from
//! `pg_settings` and `SHOW ALL`, so no `setting`/`boot_val`/`reset_val` column can leak). A
//! show hook replaces the value with the key's fingerprint for everyone, so `SHOW` and
//! `current_setting()` — which members of `pg_read_all_settings` may call despite
//! `SUPERUSER_ONLY` — never reveal it. The check hook refuses malformed keys (without echoing
//! them), values stored where any role can read them (`ALTER DATABASE/ROLE ... SET`, a
//! function's `SET` clause), and config-file values when the library is not preloaded.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::keys::{self, KeyError, KeyRing, KeySource};
use provider_keys_encrypt_core::format_llmgw;

/// Raw value of `provider_keys_encrypt.encryption_key` (blank: use `ENCRYPTION_KEY`).
pub static ENCRYPTION_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Raw value of `provider_keys_encrypt.previous_keys`.
pub static PREVIOUS_KEYS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Whether this library was loaded through `shared_preload_libraries` (set in `_PG_init`).
static mut PRELOADED: bool = false;

thread_local! {
    /// The key ring, built on first use and rebuilt after any assignment to either setting.
    /// `None` = stale. Errors are cached too, so a bad key costs one parse, not one per row.
    static RING: RefCell<Option<Result<Rc<KeyRing>, KeyError>>> = const { RefCell::new(None) };
    /// The gateway's keyring (GATEWAY_API_KEY_HASH_SECRET), built on first use. The
    /// environment does not change while the backend runs, so it is never rebuilt.
    static GATEWAY_RING: RefCell<Option<Result<Rc<format_llmgw::Keyring>, format_llmgw::LlmgwError>>> =
        const { RefCell::new(None) };
}

pub fn init() {
    // SAFETY: _PG_init runs once per process, single-threaded, before any hook can fire.
    unsafe { PRELOADED = pg_sys::process_shared_preload_libraries_in_progress };
    let flags = GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL | GucFlags::NO_RESET_ALL;
    // SAFETY: the hooks below follow guc.h's contracts: check hooks only set
    // GUC_check_err* and return false, assign hooks cannot fail, show hooks return palloc'd
    // strings.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"provider_keys_encrypt.encryption_key",
            c"Base64 of the 32-byte AES-256-GCM key. Blank: use the server's ENCRYPTION_KEY environment variable.",
            c"Shown as its fingerprint, never as its value. Prefer the ENCRYPTION_KEY environment variable.",
            &ENCRYPTION_KEY,
            GucContext::Suset,
            flags,
            Some(check_encryption_key),
            Some(assign_any),
            Some(show_encryption_key),
        );
        GucRegistry::define_string_guc_with_hooks(
            c"provider_keys_encrypt.previous_keys",
            c"Comma-separated base64 keys that tokens may still be encrypted under (decryption only).",
            c"Used to decrypt and to rotate (reencrypt_provider_keys). Shown as fingerprints.",
            &PREVIOUS_KEYS,
            GucContext::Suset,
            flags,
            Some(check_previous_keys),
            Some(assign_any),
            Some(show_previous_keys),
        );
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        pg_sys::MarkGUCPrefixReserved(c"provider_keys_encrypt".as_ptr());
    }
}

/// Run `f` with the current key ring, building it if a setting changed since the last call.
pub fn with_keyring<T>(f: impl FnOnce(&KeyRing) -> T) -> Result<T, KeyError> {
    let ring = RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        slot.get_or_insert_with(|| build_ring().map(Rc::new))
            .clone()
    })?;
    Ok(f(&ring))
}

/// Run `f` with the gateway's keyring, read from the server's `GATEWAY_API_KEY_HASH_SECRET`
/// environment variable (comma-separated secrets, current first) on first use and cached for
/// the life of the backend. Missing or empty: `LlmgwError::MissingSecret` (SQLSTATE 55000).
pub fn with_gateway_keyring<T>(
    f: impl FnOnce(&format_llmgw::Keyring) -> T,
) -> Result<T, crate::errors::Error> {
    let ring = GATEWAY_RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        slot.get_or_insert_with(|| build_gateway_ring().map(Rc::new))
            .clone()
    })?;
    Ok(f(&ring))
}

fn build_gateway_ring() -> Result<format_llmgw::Keyring, format_llmgw::LlmgwError> {
    // Node decodes the environment as UTF-8 with U+FFFD for invalid bytes: env_text does too.
    let text = std::env::var_os(format_llmgw::ENV_VAR)
        .map(|v| keys::env_text(std::os::unix::ffi::OsStringExt::into_vec(v)))
        .ok_or(format_llmgw::LlmgwError::MissingSecret)?;
    format_llmgw::Keyring::parse(&text)
}

fn build_ring() -> Result<KeyRing, KeyError> {
    // The environment value is copied into a zeroizing buffer; the settings are borrowed.
    let env = std::env::var(keys::ENV_VAR)
        .ok()
        .map(zeroize::Zeroizing::new);
    KeyRing::from_config(
        setting_str(&ENCRYPTION_KEY),
        env.as_deref().map(String::as_str),
        setting_str(&PREVIOUS_KEYS),
    )
}

/// Borrow a string setting's current value without copying it.
fn setting_str(setting: &'static GucSetting<Option<CString>>) -> Option<&'static str> {
    // SAFETY: PostgreSQL owns the string and replaces (never mutates) it on assignment; we
    // only hold the borrow for the duration of one key-ring build in this backend.
    unsafe {
        let p = *setting.as_ptr();
        if p.is_null() {
            None
        } else {
            CStr::from_ptr(p).to_str().ok()
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn assign_any(_newval: *const c_char, _extra: *mut c_void) {
    // Never fails (guc.h forbids it): just mark the cached ring stale. Dropping it wipes
    // the expanded keys.
    RING.with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            *slot = None;
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn check_encryption_key(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: guc.c passes a valid pointer to a (possibly NULL) C string.
    unsafe {
        check_setting(newval, source, KeySource::Setting, |v| {
            keys::parse_key(v, KeySource::Setting).map(drop)
        })
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_previous_keys(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: as above.
    unsafe {
        check_setting(newval, source, KeySource::Previous(1), |v| {
            keys::split_previous(v)
                .enumerate()
                .try_for_each(|(i, entry)| {
                    keys::parse_key(entry, KeySource::Previous(i + 1)).map(drop)
                })
        })
    }
}

/// The check both settings share: a blank value (no key) is always accepted; anything else
/// must come from a place that keeps it secret, be UTF-8, and pass `validate`.
///
/// # Safety
/// `newval` must be a valid pointer to a NUL-terminated string or to NULL.
unsafe fn check_setting(
    newval: *mut *mut c_char,
    source: pg_sys::GucSource::Type,
    what: KeySource,
    validate: impl Fn(&str) -> Result<(), KeyError>,
) -> bool {
    // SAFETY: guaranteed by the caller.
    let bytes = unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        CStr::from_ptr(*newval).to_bytes()
    };
    if bytes.trim_ascii().is_empty() {
        return true; // blank: no key (for encryption_key: use ENCRYPTION_KEY)
    }
    if let Err(e) = check_source(source) {
        return e;
    }
    match std::str::from_utf8(bytes) {
        // not UTF-8 is not base64 either; without this check it would pass as "blank"
        Err(_) => reject_value(&KeyError::Invalid(what)),
        Ok(v) => match validate(v) {
            Ok(()) => true,
            Err(e) => reject_value(&e),
        },
    }
}

/// Refuse the places where a stored key would be readable by roles that are not superusers.
/// Returns `Err(false)` (the hook's answer) after setting the message.
fn check_source(source: pg_sys::GucSource::Type) -> Result<(), bool> {
    use pg_sys::GucSource::*;
    match source {
        PGC_S_GLOBAL | PGC_S_DATABASE | PGC_S_USER | PGC_S_DATABASE_USER | PGC_S_TEST => Err(reject(
            PgSqlErrorCode::ERRCODE_CANT_CHANGE_RUNTIME_PARAM,
            c"provider_keys_encrypt keys cannot be stored with ALTER DATABASE/ROLE ... SET or in a function's SET clause",
            Some(c"Those catalogs are readable by every role. Put the key in the server's ENCRYPTION_KEY environment variable instead."),
        )),
        // SAFETY: PRELOADED is written once in _PG_init, before any hook runs.
        PGC_S_FILE | PGC_S_ARGV if unsafe { !PRELOADED } => Err(reject(
            PgSqlErrorCode::ERRCODE_CANT_CHANGE_RUNTIME_PARAM,
            c"provider_keys_encrypt keys set in a configuration file or on the command line require shared_preload_libraries = 'provider_keys_encrypt'",
            Some(c"Until the library is loaded, any role can read such a value with SHOW. Preload the library, or use the ENCRYPTION_KEY environment variable."),
        )),
        _ => Ok(()),
    }
}

fn reject_value(e: &KeyError) -> bool {
    let msg = CString::new(e.to_string()).unwrap_or_default();
    reject(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        &msg,
        Some(c"Generate a key with: openssl rand -base64 32"),
    )
}

/// Set the message a failed check hook reports. Our own message replaces guc.c's default
/// `invalid value for parameter "...": "<value>"`, which would echo the key.
fn reject(code: PgSqlErrorCode, msg: &CStr, hint: Option<&CStr>) -> bool {
    // SAFETY: these globals are read by guc.c right after the hook returns; pstrdup copies
    // into the current memory context, which outlives that report.
    unsafe {
        pg_sys::GUC_check_errcode(code as i32);
        pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(msg.as_ptr());
        if let Some(h) = hint {
            pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(h.as_ptr());
        }
    }
    false
}

/// What `SHOW provider_keys_encrypt.encryption_key` prints: never the key.
pub fn describe_current() -> String {
    let fp = |v: &str, src| keys::parse_key(v, src).map(|k| keys::fingerprint(&k));
    match setting_str(&ENCRYPTION_KEY).filter(|v| !v.trim_ascii().is_empty()) {
        Some(v) => match fp(v, KeySource::Setting) {
            Ok(f) => format!("set, fingerprint {f}"),
            Err(_) => "set, invalid".into(),
        },
        None => match std::env::var(keys::ENV_VAR)
            .ok()
            .map(zeroize::Zeroizing::new)
        {
            Some(v) if !v.trim_ascii().is_empty() => match fp(&v, KeySource::Environment) {
                Ok(f) => format!("from ENCRYPTION_KEY, fingerprint {f}"),
                Err(_) => "from ENCRYPTION_KEY, invalid".into(),
            },
            _ => "not set".into(),
        },
    }
}

/// What `SHOW provider_keys_encrypt.previous_keys` prints: the fingerprints, in order.
pub fn describe_previous() -> String {
    let entries: Vec<String> = keys::split_previous(setting_str(&PREVIOUS_KEYS).unwrap_or(""))
        .map(|v| match keys::parse_key(v, KeySource::Previous(0)) {
            Ok(k) => keys::fingerprint(&k),
            Err(_) => "invalid".into(),
        })
        .collect();
    if entries.is_empty() {
        "none".into()
    } else {
        format!("fingerprints {}", entries.join(", "))
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn show_encryption_key() -> *const c_char {
    palloc_str(&describe_current())
}

#[pg_guard]
unsafe extern "C-unwind" fn show_previous_keys() -> *const c_char {
    palloc_str(&describe_previous())
}

fn palloc_str(s: &str) -> *const c_char {
    let c = CString::new(s).unwrap_or_default();
    // SAFETY: pstrdup copies into the current memory context, as guc.c expects.
    unsafe { pg_sys::pstrdup(c.as_ptr()) }
}
