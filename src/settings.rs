//! Where the keys come from, the settings that display them, and the check that the server is
//! set up so that no key can leak ([`check_setup`]).
//!
//! **The keys come from the server's environment**, read with `std::env::var_os` (or from the
//! file `<VAR>_FILE` names) and decoded exactly as Node does (`keys::env_text`; see
//! docs/configuration.md), **or, when `provider_keys_encrypt.key_command` is set, only from
//! what that command printed** (`key_command.rs`: shared memory, one run per reload). No SQL
//! setting ever holds one. [`key_text`] hands them to `keyring.rs`, which builds and caches
//! each format's keyring:
//!
//! | variable                      | what                                               | [`KeyVar`]  |
//! |-------------------------------|----------------------------------------------------|-------------|
//! | `ENCRYPTION_KEY`              | the current base64 key (32 bytes)                  | `Current`   |
//! | `ENCRYPTION_KEY_PREVIOUS`     | comma-separated previous keys, decryption only     | `Previous`  |
//! | `GATEWAY_API_KEY_HASH_SECRET` | the gateway's llmgw secrets, comma-separated       | `Gateway`   |
//!
//! **The settings are read-only displays.** `provider_keys_encrypt.encryption_key`,
//! `.previous_keys` and `.gateway_api_key_hash_secret` show the fingerprints (key ids) of what
//! the environment holds, never a value. Their check hook refuses every value from every
//! source (SET, SET LOCAL, set_config, ALTER SYSTEM, ALTER DATABASE/ROLE SET, a function's
//! SET clause, postgresql.conf, `-c`, PGOPTIONS) with SQLSTATE 55P02 and a message of its own,
//! so PostgreSQL's `invalid value for parameter "…": "<value>"` never echoes a key. They are
//! `SUSET`, `SUPERUSER_ONLY` and `NO_SHOW_ALL`.
//!
//! **The library must be preloaded** (`shared_preload_libraries`): only then does the check
//! hook exist in every backend before any statement, so no path can store a key where other
//! roles read it. Where PostgreSQL stored a key before the hook could refuse it (a config
//! file or `-c` value, seen when the hook is first installed or on reload; an `ALTER
//! DATABASE/ROLE … SET` or a function's `SET` clause made while the library was not loaded),
//! [`check_setup`] finds it at first use and every function refuses (55P02, naming where)
//! until it is removed. Without preloading every function refuses (F0000).

use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PgSqlErrorCode};
use provider_keys_encrypt_core::key_command::{KeyCommandError, KeyCommandVars};
use zeroize::Zeroizing;

use crate::errors::{ConfigPlace, Error, SetupError};
use crate::key_command::{self, Keys};
use crate::log_filter;
use provider_keys_encrypt_core::format::llmgw;
use provider_keys_encrypt_core::key_file;
use provider_keys_encrypt_core::keys::{self, KeySource};

/// `provider_keys_encrypt.encryption_key`: displays `ENCRYPTION_KEY`'s fingerprint.
pub static ENCRYPTION_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// `provider_keys_encrypt.previous_keys`: displays `ENCRYPTION_KEY_PREVIOUS`'s fingerprints.
pub static PREVIOUS_KEYS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// `provider_keys_encrypt.gateway_api_key_hash_secret`: displays the gateway keyring's key ids.
pub static GATEWAY_SECRET: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The three read-only settings, each standing for one environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    EncryptionKey,
    PreviousKeys,
    GatewaySecret,
}

impl Setting {
    pub const ALL: [Setting; 3] = [
        Setting::EncryptionKey,
        Setting::PreviousKeys,
        Setting::GatewaySecret,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setting::EncryptionKey => "provider_keys_encrypt.encryption_key",
            Setting::PreviousKeys => "provider_keys_encrypt.previous_keys",
            Setting::GatewaySecret => "provider_keys_encrypt.gateway_api_key_hash_secret",
        }
    }

    /// The environment variable the setting displays (the only place its value comes from).
    pub fn env_var(self) -> &'static str {
        match self {
            Setting::EncryptionKey => keys::ENV_VAR,
            Setting::PreviousKeys => keys::ENV_VAR_PREVIOUS,
            Setting::GatewaySecret => llmgw::ENV_VAR,
        }
    }

    fn from_name(name: &str) -> Option<Setting> {
        Setting::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// Whether `_PG_init` ran inside `shared_preload_libraries` processing (then every process
/// of the server, forked from the postmaster, has the library and its check hooks).
static PRELOADED: AtomicBool = AtomicBool::new(false);
/// True while `_PG_init` defines the settings: PostgreSQL then replays onto them any value a
/// placeholder held (from a file, the command line, a role setting, an earlier SET).
static INITIALIZING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// A key PostgreSQL applied from a config file or the command line (the check hook
    /// refused it, but it is in a file or argv): every function refuses while this is set.
    /// Set in the postmaster, it is inherited by every backend it forks afterwards.
    static GIVEN_IN_CONFIG: Cell<Option<(Setting, ConfigPlace)>> = const { Cell::new(None) };
    /// Moves when the check hook finds a key given in a config file or on the command line:
    /// `keyring.rs` rebuilds (and so checks the setup again) any ring built in another epoch.
    static EPOCH: Cell<u64> = const { Cell::new(0) };
}

/// The keyrings' epoch (see `keyring.rs`).
pub fn epoch() -> u64 {
    EPOCH.with(Cell::get) + key_command::changes()
}

pub fn init() {
    // SAFETY: _PG_init runs once per process, single-threaded, before any hook can fire.
    PRELOADED.store(
        unsafe { pg_sys::process_shared_preload_libraries_in_progress },
        Ordering::Relaxed,
    );
    INITIALIZING.store(true, Ordering::Relaxed);
    let flags = GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL;
    // SAFETY: the hooks below follow guc.h's contracts: check hooks only set
    // GUC_check_err* and return false, show hooks return palloc'd strings.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"provider_keys_encrypt.encryption_key",
            c"Read-only: the fingerprint of the server's ENCRYPTION_KEY environment variable.",
            c"Keys come only from the server's environment, decoded as the gateway's Buffer.from(value, 'base64'). This setting cannot be set.",
            &ENCRYPTION_KEY,
            GucContext::Suset,
            flags,
            Some(check_encryption_key),
            None,
            Some(show_encryption_key),
        );
        GucRegistry::define_string_guc_with_hooks(
            c"provider_keys_encrypt.previous_keys",
            c"Read-only: the fingerprints of the server's ENCRYPTION_KEY_PREVIOUS environment variable (comma-separated keys, decryption only).",
            c"Keys come only from the server's environment. This setting cannot be set.",
            &PREVIOUS_KEYS,
            GucContext::Suset,
            flags,
            Some(check_previous_keys),
            None,
            Some(show_previous_keys),
        );
        GucRegistry::define_string_guc_with_hooks(
            c"provider_keys_encrypt.gateway_api_key_hash_secret",
            c"Read-only: the key ids of the server's GATEWAY_API_KEY_HASH_SECRET environment variable (the gateway's llmgw keyring).",
            c"Secrets come only from the server's environment. This setting cannot be set.",
            &GATEWAY_SECRET,
            GucContext::Suset,
            flags,
            Some(check_gateway_secret),
            None,
            Some(show_gateway_secret),
        );
    }
    // the key command's two settings (and its hidden one for parallel workers)
    key_command::define_settings();
    // SAFETY: called once, after this library's settings are defined.
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"provider_keys_encrypt".as_ptr());
    }
    log_filter::install(is_refusal_message);
    INITIALIZING.store(false, Ordering::Relaxed);
    // Read the key variables now: preloading, this is the postmaster, so every backend
    // inherits what the server started with and none reads a key file itself. A refused
    // `<VAR>_FILE` is logged here once (path and cause, never content); every function that
    // needs that key raises the same error.
    if PRELOADED.load(Ordering::Relaxed) {
        let vars = key_vars();
        for e in [&vars.current, &vars.previous, &vars.gateway]
            .into_iter()
            .filter_map(|v| v.as_ref().err())
        {
            pgrx::warning!("provider_keys_encrypt: {e}");
        }
        // the key command's shared memory: the postmaster runs it once shared memory exists
        key_command::init_shared_memory(environment_names);
    }
}

/// The three key variables, each read once per server: in the postmaster while it preloads the
/// library ([`init`]), so every backend works with what the server started with, from
/// `<VAR>` or from the file `<VAR>_FILE` names (`key_file`: a regular file others cannot
/// access). Decoded as Node would see the variable, in wiping buffers.
struct KeyVars {
    current: VarValue,
    previous: VarValue,
    gateway: VarValue,
}
type VarValue =
    Result<Option<(zeroize::Zeroizing<String>, key_file::Origin)>, key_file::KeyFileError>;
static KEY_VARS: OnceLock<KeyVars> = OnceLock::new();

/// The key variables a keyring is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyVar {
    /// `ENCRYPTION_KEY`
    Current,
    /// `ENCRYPTION_KEY_PREVIOUS`
    Previous,
    /// `GATEWAY_API_KEY_HASH_SECRET`
    Gateway,
}

/// Where a key variable's value comes from now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// the server's environment: the variable, or the file `<VAR>_FILE` names
    Environment(key_file::Origin),
    /// what `provider_keys_encrypt.key_command` printed
    Command,
}

/// A key variable as the keyrings see it now: its text and source (`None`: not set), or why
/// it cannot be had (a refused `<VAR>_FILE`, a key command that failed with nothing to keep).
type Effective = Result<Option<(Zeroizing<String>, Source)>, Error>;

/// A key variable's text (`None`: not set), from the key command's last good output when one
/// is set, else from the environment the server started with. Never read by a backend of a
/// server that did not preload the library: [`check_setup`] refuses first.
pub fn key_text(var: KeyVar) -> Result<Option<Zeroizing<String>>, Error> {
    effective(var).map(|v| v.map(|(text, _)| text))
}

fn effective(var: KeyVar) -> Effective {
    match key_command::keys() {
        // the command wins: what it did not print is not set
        Some(Keys::Command(vars)) => Ok(printed(&vars, var).map(|t| (t, Source::Command))),
        Some(Keys::Failed(e)) => Err(e.into()),
        None => environment(var),
    }
}

/// A key variable as the key command printed it.
fn printed(vars: &KeyCommandVars, var: KeyVar) -> Option<Zeroizing<String>> {
    match var {
        KeyVar::Current => vars.current.clone(),
        KeyVar::Previous => vars.previous.clone(),
        KeyVar::Gateway => vars.gateway.clone(),
    }
}

/// A key variable as the server's environment gave it at start.
fn environment(var: KeyVar) -> Effective {
    let vars = key_vars();
    let env = match var {
        KeyVar::Current => &vars.current,
        KeyVar::Previous => &vars.previous,
        KeyVar::Gateway => &vars.gateway,
    };
    match env {
        Ok(v) => Ok(v
            .as_ref()
            .map(|(t, o)| (t.clone(), Source::Environment(o.clone())))),
        Err(e) => Err(e.clone().into()),
    }
}

/// What SHOW describes: like [`effective`], but from shared memory only (SHOW never runs the
/// key command, and pg_settings calls the show hooks for every role), with a note when the
/// command's last run failed.
fn shown(var: KeyVar) -> (Effective, String, bool) {
    match key_command::newest() {
        None => (environment(var), String::new(), false),
        Some((vars, error, pending)) => {
            let mut note = match &error {
                Some(e) if vars.is_some() => format!(" (the last run of key_command failed: {e})"),
                _ => String::new(),
            };
            if pending {
                note.push_str(
                    " (a reload is pending: key_command runs at the next statement that needs a key)",
                );
            }
            let value = match (vars, error) {
                (Some(vars), _) => Ok(printed(&vars, var).map(|t| (t, Source::Command))),
                (None, Some(e)) => Err(e.into()),
                (None, None) => Err(Error::KeyCommand(KeyCommandError::NotRun)),
            };
            (value, note, true)
        }
    }
}

/// The key variables the server's environment holds (names only), for the LOG line that says
/// the key command wins over them.
fn environment_names() -> Vec<&'static str> {
    let vars = key_vars();
    [
        (keys::ENV_VAR, &vars.current),
        (keys::ENV_VAR_PREVIOUS, &vars.previous),
        (llmgw::ENV_VAR, &vars.gateway),
    ]
    .into_iter()
    .filter(|(_, v)| !matches!(v, Ok(None)))
    .map(|(name, _)| name)
    .collect()
}

/// Did a reload arrive that this statement does not use yet (see `key_command`)?
pub fn keys_may_change_after_this_statement() -> bool {
    key_command::reload_pending()
}

fn read_key_var(var: &'static str) -> VarValue {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    Ok(key_file::read_var(var, |n| std::env::var_os(n), uid)?
        .map(|(mut bytes, origin)| (keys::env_text(std::mem::take(&mut *bytes)), origin)))
}

/// The key variables, read on first call. Called first by [`init`] while the postmaster
/// preloads the library; a backend that loaded the library otherwise never calls it (its
/// functions refuse with F0000 before they need a key, SHOW says "not read"), so no backend
/// reads a key file.
fn key_vars() -> &'static KeyVars {
    KEY_VARS.get_or_init(|| KeyVars {
        current: read_key_var(keys::ENV_VAR),
        previous: read_key_var(keys::ENV_VAR_PREVIOUS),
        gateway: read_key_var(llmgw::ENV_VAR),
    })
}

/// What SHOW prints in a backend that loaded the library without preloading.
const NOT_READ: &str =
    "not read: provider_keys_encrypt is not in shared_preload_libraries, so keys are not read";

/// What a refused `<VAR>_FILE` (or a key command that failed with nothing to keep) shows in
/// SHOW: the refusal, never a key.
fn refused(e: &Error) -> String {
    format!("refused: {e}")
}

/// Refuse to work while a key sits where PostgreSQL put it before the check hook could refuse
/// it, or while the library is not preloaded. Not cached while it fails: the functions work
/// again as soon as the cause is removed (a config file value: after a restart).
pub fn check_setup() -> Result<(), Error> {
    if let Some((setting, place)) = GIVEN_IN_CONFIG.with(Cell::get) {
        return Err(SetupError::given_in_config(setting.name(), place).into());
    }
    if let Some(found) = stored_keys()? {
        return Err(found.into());
    }
    if !PRELOADED.load(Ordering::Relaxed) {
        return Err(SetupError::NotPreloaded.into());
    }
    Ok(())
}

/// The catalogs where `ALTER DATABASE/ROLE … SET` and a function's `SET` clause store values,
/// readable by every role: any entry for one of the settings (whatever its value, which is
/// never read into Rust). `pg_db_role_setting` is shared by all databases; `pg_proc` is this
/// database's. Every name is schema-qualified and every operator spelled
/// `OPERATOR(pg_catalog.…)`, so the caller's search_path cannot redirect the scan.
fn stored_keys() -> Result<Option<SetupError>, Error> {
    const SCAN: &str = "
        SELECT 'setting'::pg_catalog.text, pg_catalog.quote_ident(r.rolname::pg_catalog.text),
               pg_catalog.quote_ident(d.datname::pg_catalog.text),
               pg_catalog.lower(pg_catalog.split_part(c.c, '=', 1))
          FROM pg_catalog.pg_db_role_setting s
         CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) AS c(c)
          LEFT JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) s.setrole
          LEFT JOIN pg_catalog.pg_database d ON d.oid OPERATOR(pg_catalog.=) s.setdatabase
         WHERE pg_catalog.lower(pg_catalog.split_part(c.c, '=', 1)) OPERATOR(pg_catalog.=) ANY (
               '{provider_keys_encrypt.encryption_key,provider_keys_encrypt.previous_keys,provider_keys_encrypt.gateway_api_key_hash_secret}'::pg_catalog.text[])
        UNION ALL
        SELECT 'function', p.oid::pg_catalog.regprocedure::pg_catalog.text, NULL,
               pg_catalog.lower(pg_catalog.split_part(c.c, '=', 1))
          FROM pg_catalog.pg_proc p
         CROSS JOIN LATERAL pg_catalog.unnest(p.proconfig) AS c(c)
         WHERE pg_catalog.lower(pg_catalog.split_part(c.c, '=', 1)) OPERATOR(pg_catalog.=) ANY (
               '{provider_keys_encrypt.encryption_key,provider_keys_encrypt.previous_keys,provider_keys_encrypt.gateway_api_key_hash_secret}'::pg_catalog.text[])";
    let rows: Vec<(String, Option<String>, Option<String>, String)> = Spi::connect(|client| {
        let table = client.select(SCAN, None, &[])?;
        let mut rows = Vec::new();
        for row in table {
            rows.push((
                row.get::<String>(1)?.unwrap_or_default(),
                row.get::<String>(2)?,
                row.get::<String>(3)?,
                row.get::<String>(4)?.unwrap_or_default(),
            ));
        }
        Ok::<_, pgrx::spi::SpiError>(rows)
    })
    .map_err(|_| SetupError::Scan)?;
    let count = rows.len();
    let Some((kind, a, b, name)) = rows.into_iter().next() else {
        return Ok(None);
    };
    let setting = Setting::from_name(&name)
        .unwrap_or(Setting::EncryptionKey)
        .name();
    let more = count - 1;
    Ok(Some(if kind == "function" {
        SetupError::in_function(setting, a.unwrap_or_default(), more)
    } else {
        SetupError::in_role_setting(setting, a, b, more)
    }))
}

#[pg_guard]
unsafe extern "C-unwind" fn check_encryption_key(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: guc.c passes a valid pointer to a (possibly NULL) C string.
    unsafe { check_read_only(Setting::EncryptionKey, newval, source) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_previous_keys(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: as above.
    unsafe { check_read_only(Setting::PreviousKeys, newval, source) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_gateway_secret(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: as above.
    unsafe { check_read_only(Setting::GatewaySecret, newval, source) }
}

/// The check all three settings share: the boot value (NULL) and blank values are accepted
/// (they hold nothing); any other value, from any source, is refused without being echoed.
/// A value PostgreSQL applied from a config file or the command line is remembered, so the
/// functions refuse until it is removed (see [`check_setup`]).
///
/// # Safety
/// `newval` must be a valid pointer to a NUL-terminated string or to NULL.
unsafe fn check_read_only(
    setting: Setting,
    newval: *mut *mut c_char,
    source: pg_sys::GucSource::Type,
) -> bool {
    use pg_sys::GucSource::*;
    // SAFETY: guaranteed by the caller.
    let blank = unsafe {
        newval.is_null()
            || (*newval).is_null()
            || CStr::from_ptr(*newval).to_bytes().trim_ascii().is_empty()
    };
    if blank || source == PGC_S_DEFAULT {
        return true;
    }
    // A config file or argv value reaches this hook when the library defines the setting
    // (the placeholder's value is replayed) and at each reload (no statement is running
    // then). ALTER SYSTEM and pg_file_settings also validate with PGC_S_FILE, but inside a
    // statement: ALTER SYSTEM fails with this hook's error and writes nothing.
    // SAFETY: a plain read of a backend global.
    let no_statement = unsafe { pg_sys::debug_query_string.is_null() };
    if INITIALIZING.load(Ordering::Relaxed) || no_statement {
        let place = match source {
            PGC_S_FILE => Some(ConfigPlace::File),
            PGC_S_ARGV => Some(ConfigPlace::CommandLine),
            _ => None,
        };
        if let Some(place) = place {
            if GIVEN_IN_CONFIG.with(Cell::get).is_none() {
                GIVEN_IN_CONFIG.with(|c| c.set(Some((setting, place))));
            }
            EPOCH.with(|e| e.set(e.get() + 1));
        }
    }
    let msg = refusal_message(setting);
    log_filter::mark_refused();
    let hint = format!(
        "Start the server with {} in its environment; SHOW {} displays what it holds, never the value. A key given here must be treated as exposed.",
        setting.env_var(),
        setting.name()
    );
    reject(&msg, &hint)
}

/// Is this message the check hook's refusal ([`check_read_only`]'s)? For the log filter.
fn is_refusal_message(message: &[u8]) -> bool {
    Setting::ALL
        .iter()
        .any(|s| message.starts_with(refusal_message(*s).as_bytes()))
}

/// The refusal's message for a setting (its whole text: it names no value).
fn refusal_message(setting: Setting) -> String {
    format!(
        "{} cannot be set: provider_keys_encrypt reads keys only from the server's environment ({})",
        setting.name(),
        setting.env_var()
    )
}

/// Set the message a failed check hook reports (55P02). Our own message replaces guc.c's
/// default `invalid value for parameter "...": "<value>"`, which would echo the key.
fn reject(msg: &str, hint: &str) -> bool {
    let msg = CString::new(msg).unwrap_or_default();
    let hint = CString::new(hint).unwrap_or_default();
    // SAFETY: these globals are read by guc.c right after the hook returns; pstrdup copies
    // into the current memory context, which outlives that report.
    unsafe {
        pg_sys::GUC_check_errcode(PgSqlErrorCode::ERRCODE_CANT_CHANGE_RUNTIME_PARAM as i32);
        pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(msg.as_ptr());
        pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(hint.as_ptr());
    }
    false
}

/// Where a variable's value came from, for SHOW: `ENCRYPTION_KEY`,
/// `ENCRYPTION_KEY_FILE (/run/secrets/encryption_key)` or `key_command`.
fn source_name(name: &str, source: &Source) -> String {
    match source {
        Source::Environment(key_file::Origin::File(path)) => {
            format!("{name}_FILE ({})", path.display())
        }
        Source::Environment(key_file::Origin::Environment) => name.to_owned(),
        Source::Command => "key_command".to_owned(),
    }
}

/// Where an unset variable was looked for, for SHOW.
fn not_set(names: &str, by_command: bool) -> String {
    if by_command {
        "not set (key_command printed none)".into()
    } else {
        format!("not set (no {names} in the server's environment)")
    }
}

/// What `SHOW provider_keys_encrypt.encryption_key` prints: never the key.
pub fn describe_current() -> String {
    if !PRELOADED.load(Ordering::Relaxed) {
        return NOT_READ.into();
    }
    let (value, note, by_command) = shown(KeyVar::Current);
    let shown = match value.map(|v| v.filter(|(v, _)| !v.trim().is_empty())) {
        Err(e) => refused(&e),
        Ok(None) => not_set("ENCRYPTION_KEY or ENCRYPTION_KEY_FILE", by_command),
        Ok(Some((v, source))) => {
            let from = source_name(keys::ENV_VAR, &source);
            match keys::parse_key(&v, KeySource::Environment) {
                Ok(k) => format!("from {from}, fingerprint {}", keys::fingerprint(&k)),
                Err(_) => format!(
                    "from {from}, invalid: not 32 bytes as Buffer.from(value, 'base64') decodes it"
                ),
            }
        }
    };
    shown + &note
}

/// What `SHOW provider_keys_encrypt.previous_keys` prints: the fingerprints, in order.
pub fn describe_previous() -> String {
    if !PRELOADED.load(Ordering::Relaxed) {
        return NOT_READ.into();
    }
    let (value, note, by_command) = shown(KeyVar::Previous);
    let (text, source) = match value {
        Err(e) => return refused(&e) + &note,
        Ok(Some((t, source))) => (t, Some(source)),
        Ok(None) => (Zeroizing::new(String::new()), None),
    };
    let entries: Vec<String> = keys::parse_key_list(&text, KeySource::EnvironmentPrevious)
        .map(|k| match k {
            Ok(k) => keys::fingerprint(&k),
            Err(_) => "invalid".into(),
        })
        .collect();
    let shown = match source {
        Some(source) if !entries.is_empty() => format!(
            "from {}, fingerprints {}",
            source_name(keys::ENV_VAR_PREVIOUS, &source),
            entries.join(", ")
        ),
        _ if by_command => "none (key_command printed none)".into(),
        _ => "none (no ENCRYPTION_KEY_PREVIOUS in the server's environment)".into(),
    };
    shown + &note
}

/// What `SHOW provider_keys_encrypt.gateway_api_key_hash_secret` prints: the key ids (public:
/// every llmgw:v2 token carries one), current first.
pub fn describe_gateway() -> String {
    if !PRELOADED.load(Ordering::Relaxed) {
        return NOT_READ.into();
    }
    let (value, note, by_command) = shown(KeyVar::Gateway);
    let shown = match value {
        Err(e) => refused(&e),
        Ok(Some((text, source))) => match llmgw::Keyring::parse(&text) {
            Ok(ring) => {
                let ids: Vec<String> = ring.entries().iter().map(|s| s.kid().to_string()).collect();
                format!(
                    "from {}, key ids {}",
                    source_name(llmgw::ENV_VAR, &source),
                    ids.join(", ")
                )
            }
            Err(_) => not_set("GATEWAY_API_KEY_HASH_SECRET", by_command),
        },
        Ok(None) => not_set("GATEWAY_API_KEY_HASH_SECRET", by_command),
    };
    shown + &note
}

#[pg_guard]
unsafe extern "C-unwind" fn show_encryption_key() -> *const c_char {
    palloc_str(&describe_current())
}

#[pg_guard]
unsafe extern "C-unwind" fn show_previous_keys() -> *const c_char {
    palloc_str(&describe_previous())
}

#[pg_guard]
unsafe extern "C-unwind" fn show_gateway_secret() -> *const c_char {
    palloc_str(&describe_gateway())
}

fn palloc_str(s: &str) -> *const c_char {
    let c = CString::new(s).unwrap_or_default();
    // SAFETY: pstrdup copies into the current memory context, as guc.c expects.
    unsafe { pg_sys::pstrdup(c.as_ptr()) }
}
