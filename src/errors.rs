//! One error type for everything the SQL surface can raise, each cause with its own SQLSTATE.
//!
//! | cause                                   | SQLSTATE | condition name                   |
//! |-----------------------------------------|----------|----------------------------------|
//! | library not in shared_preload_libraries | F0000    | config_file_error                |
//! | a key given in SQL or config (refused by the settings, or found stored at first use) | 55P02 | cant_change_runtime_param |
//! | the catalog scan for stored keys failed | 58000    | system_error                     |
//! | no key configured                       | 55000    | object_not_in_prerequisite_state |
//! | key not 32 bytes of base64              | 22023    | invalid_parameter_value          |
//! | both `<VAR>` and `<VAR>_FILE` set        | 42710    | duplicate_object                 |
//! | `<VAR>_FILE` not an absolute path, or the file holds no value | 22023 | invalid_parameter_value |
//! | the file `<VAR>_FILE` names is missing   | 58P01    | undefined_file                   |
//! | … cannot be read (permission, not a regular file, over 64 KiB) | 58030 | io_error  |
//! | … others can access it or its group write it, or its owner is neither the server's user nor root (as PostgreSQL's ssl_key_file check) | F0000 | config_file_error |
//! | key_command could not be started        | 58000    | system_error                     |
//! | key_command exited non-zero or was killed | 38000  | external_routine_exception       |
//! | key_command ran past key_command_timeout | 57014   | query_canceled                   |
//! | key_command printed over 64 KiB         | 54000    | program_limit_exceeded           |
//! | key_command printed a line that is not NAME=value, or a name twice | 22P02 | invalid_text_representation |
//! | key_command printed none of the key variables | 55000 | object_not_in_prerequisite_state |
//! | value is not a token (base64 / length)  | 22P02    | invalid_text_representation      |
//! | token authenticates under no key        | 22000    | data_exception                   |
//! | decrypted bytes are not UTF-8 text      | 22021    | character_not_in_repertoire      |
//! | plaintext or token over the size limit  | 54000    | program_limit_exceeded           |
//! | a buffer sized by the input can't fit   | 53200    | out_of_memory                    |
//! | OS random generator failed              | 58000    | system_error                     |
//!
//! The gateway's llmgw format (`Error::Llmgw`):
//!
//! | cause                                          | SQLSTATE | condition name                   |
//! |------------------------------------------------|----------|----------------------------------|
//! | GATEWAY_API_KEY_HASH_SECRET missing or empty   | 55000    | object_not_in_prerequisite_state |
//! | not an llmgw token / malformed token           | 22P02    | invalid_text_representation      |
//! | unknown llmgw version (not v1/v2)              | 0A000    | feature_not_supported            |
//! | sealed under a key id not in the keyring       | 22023    | invalid_parameter_value          |
//! | does not authenticate for this row             | 22000    | data_exception                   |
//! | decrypted bytes are not UTF-8 text             | 22021    | character_not_in_repertoire      |
//! | plaintext or token over the size limit         | 54000    | program_limit_exceeded           |
//! | OS random generator failed                     | 58000    | system_error                     |
//! | NULL row id given to an llmgw function         | 22004    | null_value_not_allowed           |
//!
//! The guard trigger (`Error::Guard`, see `guard.rs`):
//!
//! | cause                                              | SQLSTATE | condition name                   |
//! |----------------------------------------------------|----------|----------------------------------|
//! | mode=reject: a token that is not encrypted (llmgw: a non-NULL `token`) | 23000 | integrity_constraint_violation |
//! | unknown or repeated trigger argument               | 22023    | invalid_parameter_value          |
//! | not fired BEFORE INSERT/UPDATE FOR EACH ROW        | 39P01    | trigger_protocol_violated        |
//! | the table lacks a column the format needs (base64: id, token, provider, status; llmgw: id, token, provider, token_ciphertext, token_hash, token_masked, organization_id) | 42703 | undefined_column |
//! | one of those columns is not text or varchar        | 42804    | datatype_mismatch                |
//! | a sealed value is longer than its varchar(n) column | 22001   | string_data_right_truncation     |
//! | llmgw: a plaintext `token` on a row whose id is NULL | 22004  | null_value_not_allowed           |
//!
//! Messages are fixed strings or name a setting, a table, a column or a row's id: never a key,
//! a token or a plaintext.

use std::borrow::Cow;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

use provider_keys_encrypt_core::format::base64::Base64Error;
use provider_keys_encrypt_core::format::llmgw::LlmgwError;
use provider_keys_encrypt_core::format::Format;
use provider_keys_encrypt_core::guard::ArgumentError;
use provider_keys_encrypt_core::key_command::KeyCommandError;
use provider_keys_encrypt_core::key_file::KeyFileError;
use provider_keys_encrypt_core::keys::KeyError;

use crate::log_filter;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The server is set up so that keys could leak: refuse to work (see
    /// `settings::check_setup`).
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A `<VAR>_FILE` the server refused to read a key from (`key_file`).
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// `provider_keys_encrypt.key_command` failed, with no keys to keep.
    #[error(transparent)]
    KeyCommand(#[from] KeyCommandError),
    /// The guide's base64 format and its ENCRYPTION_KEY keyring.
    #[error(transparent)]
    Token(#[from] Base64Error),
    /// The gateway's llmgw format and its GATEWAY_API_KEY_HASH_SECRET keyring.
    #[error(transparent)]
    Llmgw(#[from] LlmgwError),
    /// PREPARE TRANSACTION of a transaction that used keys from the key command.
    #[error(
        "a transaction that used keys from provider_keys_encrypt.key_command cannot be prepared \
         (PREPARE TRANSACTION)"
    )]
    PrepareWithCommandKeys,
    /// An llmgw token is bound to its row's id: there is no token for a NULL id.
    #[error("id must not be NULL: an llmgw token is bound to its row's id")]
    NullRowId,
    /// The guard trigger: its arguments, its table, and what it refuses.
    #[error(transparent)]
    Guard(#[from] GuardError),
}

/// Why the guard trigger (`provider_keys_encrypt_guard()`) raised. Names tables, columns, row
/// ids and trigger arguments (none of them secret), never a token or a plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// mode=reject: the row's new token does not authenticate under any configured key
    /// (format=llmgw: the row's `token` is not NULL).
    #[error("the guard on table \"{table}\" refused provider key {id}: {why}")]
    Refused {
        table: String,
        id: String,
        why: &'static str,
        format: Format,
    },
    /// An unknown, malformed or repeated trigger argument (the text is the argument's, which
    /// is not secret: it is in pg_trigger for everyone to read).
    #[error("provider_keys_encrypt_guard(): {0}")]
    Argument(String),
    /// Fired other than BEFORE INSERT OR UPDATE ... FOR EACH ROW.
    #[error("provider_keys_encrypt_guard() must be fired BEFORE INSERT OR UPDATE, FOR EACH ROW")]
    Protocol,
    #[error("column \"{column}\" of relation \"{table}\" does not exist")]
    MissingColumn { table: String, column: &'static str },
    #[error(
        "column \"{column}\" of relation \"{table}\" must be text or varchar, not {type_name}"
    )]
    ColumnType {
        table: String,
        column: &'static str,
        type_name: String,
    },
    /// A value the guard sealed does not fit a varchar(n) column.
    #[error("value too long for type character varying({max})")]
    TooLong {
        max: usize,
        id: String,
        column: &'static str,
    },
}

impl Error {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Error::Setup(SetupError::NotPreloaded) => ERRCODE_CONFIG_FILE_ERROR,
            Error::Setup(SetupError::KeyGiven { .. }) => ERRCODE_CANT_CHANGE_RUNTIME_PARAM,
            Error::Setup(SetupError::Scan) => ERRCODE_SYSTEM_ERROR,
            Error::Key(KeyError::Missing) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Error::Key(KeyError::Invalid(_)) => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::KeyFile(e) => match e {
                KeyFileError::BothSet { .. } => ERRCODE_DUPLICATE_OBJECT,
                KeyFileError::NotAbsolute { .. } | KeyFileError::Empty { .. } => {
                    ERRCODE_INVALID_PARAMETER_VALUE
                }
                KeyFileError::Missing { .. } => ERRCODE_UNDEFINED_FILE,
                KeyFileError::Unreadable { .. } => ERRCODE_IO_ERROR,
                // PostgreSQL's own code for an ssl_key_file with the wrong owner or mode
                KeyFileError::OthersCanAccess { .. } | KeyFileError::WrongOwner { .. } => {
                    ERRCODE_CONFIG_FILE_ERROR
                }
            },
            Error::KeyCommand(e) => match e {
                KeyCommandError::Spawn(_) => ERRCODE_SYSTEM_ERROR,
                KeyCommandError::Failed(_) => ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
                // what statement_timeout raises: the time ran out, and it was stopped
                KeyCommandError::TimedOut(_) => ERRCODE_QUERY_CANCELED,
                KeyCommandError::TooLarge => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                KeyCommandError::Malformed(_) | KeyCommandError::Duplicate(_) => {
                    ERRCODE_INVALID_TEXT_REPRESENTATION
                }
                KeyCommandError::NoKeys | KeyCommandError::NotRun => {
                    ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
                }
                KeyCommandError::Invalid(..) => ERRCODE_INVALID_PARAMETER_VALUE,
                // a retry succeeds: the statement then starts under the new keys
                KeyCommandError::Moved => ERRCODE_T_R_SERIALIZATION_FAILURE,
            },
            Error::Token(Base64Error::NotBase64 | Base64Error::TooShort) => {
                ERRCODE_INVALID_TEXT_REPRESENTATION
            }
            Error::Token(Base64Error::Unauthenticated) => ERRCODE_DATA_EXCEPTION,
            Error::Token(Base64Error::NotText) => ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            Error::Token(Base64Error::TooLong | Base64Error::TokenTooLong) => {
                ERRCODE_PROGRAM_LIMIT_EXCEEDED
            }
            Error::Token(Base64Error::OutOfMemory) => ERRCODE_OUT_OF_MEMORY,
            Error::Token(Base64Error::NoRandomness) => ERRCODE_SYSTEM_ERROR,
            Error::Llmgw(e) => match e {
                LlmgwError::MissingSecret => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                LlmgwError::NotAToken | LlmgwError::Malformed(_) => {
                    ERRCODE_INVALID_TEXT_REPRESENTATION
                }
                // A version this extension does not implement (a newer gateway's token).
                LlmgwError::UnknownVersion => ERRCODE_FEATURE_NOT_SUPPORTED,
                LlmgwError::UnknownKeyId(_) => ERRCODE_INVALID_PARAMETER_VALUE,
                LlmgwError::DoesNotAuthenticate => ERRCODE_DATA_EXCEPTION,
                LlmgwError::NotText => ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
                LlmgwError::TooLong => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                LlmgwError::NoRandomness => ERRCODE_SYSTEM_ERROR,
            },
            Error::Guard(e) => match e {
                GuardError::Refused { .. } => ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION,
                GuardError::Argument(_) => ERRCODE_INVALID_PARAMETER_VALUE,
                GuardError::Protocol => ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                GuardError::MissingColumn { .. } => ERRCODE_UNDEFINED_COLUMN,
                GuardError::ColumnType { .. } => ERRCODE_DATATYPE_MISMATCH,
                GuardError::TooLong { .. } => ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            },
            Error::NullRowId => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            Error::PrepareWithCommandKeys => ERRCODE_FEATURE_NOT_SUPPORTED,
        }
    }

    pub fn hint(&self) -> Option<Cow<'static, str>> {
        Some(Cow::Borrowed(match self {
            Error::Setup(SetupError::NotPreloaded) => {
                "Add shared_preload_libraries = 'provider_keys_encrypt' to postgresql.conf and \
                 restart the server (see docs/install.md, \"Preloading is required\")."
            }
            Error::Setup(SetupError::KeyGiven { fix, .. }) => {
                return Some(Cow::Owned(format!(
                    "{fix} Keys come only from the server's environment: ENCRYPTION_KEY, \
                     ENCRYPTION_KEY_PREVIOUS, GATEWAY_API_KEY_HASH_SECRET."
                )))
            }
            Error::KeyFile(e) => {
                let var = e.var();
                return Some(Cow::Owned(match e {
                    KeyFileError::BothSet { .. } => format!(
                        "Remove {var} or {var}_FILE from the server's environment (Debian: \
                         /etc/postgresql/NN/main/environment) and restart the server."
                    ),
                    KeyFileError::Missing { .. } => format!(
                        "Create the file or correct {var}_FILE, then restart the server: key \
                         files are read once, when the server starts."
                    ),
                    KeyFileError::Unreadable { .. } => format!(
                        "The server reads {var}_FILE as its own OS user (postgres): make the \
                         file a regular file that user can read (owner postgres, mode 0400 or \
                         0600; or group postgres, mode 0440 or 0640), then restart the server."
                    ),
                    KeyFileError::OthersCanAccess { path, .. } => format!(
                        "Make it mode 0600, 0400, 0640 or 0440 (chmod go-w,o-rwx {path}; in \
                         Kubernetes give the secret volume defaultMode: 0400, or 0440 with \
                         fsGroup), then restart the server. A key others could read may be \
                         exposed: consider rotating it."
                    ),
                    KeyFileError::WrongOwner { path, .. } => format!(
                        "Give it to the server's user or root (chown postgres {path}), then \
                         restart the server. Its owner could read or replace the key: consider \
                         rotating it."
                    ),
                    KeyFileError::NotAbsolute { .. } => format!(
                        "Name the file by its absolute path in {var}_FILE (a relative one would \
                         be looked up in the data directory), then restart the server."
                    ),
                    KeyFileError::Empty { .. } => format!(
                        "Write the value into the file (or remove {var}_FILE if there is none), \
                         then restart the server."
                    ),
                }));
            }
            Error::KeyCommand(KeyCommandError::Moved) => {
                "Run the statement again: it starts under the keys the server has now."
            }
            Error::KeyCommand(_) => {
                "Run the command as the server's OS user (sudo -u postgres sh -c '<command>') to \
                 see what it prints: NAME=value lines for ENCRYPTION_KEY, ENCRYPTION_KEY_PREVIOUS \
                 and GATEWAY_API_KEY_HASH_SECRET. Fix it, then SELECT pg_reload_conf()."
            }
            Error::Guard(GuardError::TooLong { column, .. }) => {
                return Some(Cow::Owned(format!(
                    "The gateway's schema stores tokens as text: ALTER TABLE ... ALTER COLUMN \
                     {column} TYPE text."
                )))
            }
            _ => return self.static_hint().map(Cow::Borrowed),
        }))
    }

    pub fn detail(&self) -> Option<String> {
        match self {
            Error::Setup(SetupError::KeyGiven { more, .. }) if *more > 0 => {
                Some(format!("{more} more such setting(s) found."))
            }
            Error::Guard(GuardError::Refused {
                format: Format::Base64,
                ..
            }) => Some(
                "Its guard (mode=reject) accepts only tokens that authenticate under the current \
                 or a previous key."
                    .into(),
            ),
            Error::Guard(GuardError::Refused {
                format: Format::Llmgw,
                ..
            }) => Some(
                "Its guard (mode=reject, format=llmgw) accepts only rows whose column token is \
                 NULL."
                    .into(),
            ),
            Error::Guard(GuardError::TooLong { id, column, .. }) if *column == "token" => {
                Some(format!(
                    "The guard encrypted the token of provider key {id}; the encrypted token \
                     does not fit the column."
                ))
            }
            Error::Guard(GuardError::TooLong { id, column, .. }) => Some(format!(
                "The guard sealed the token of provider key {id}; the value it writes to column \
                 {column} does not fit."
            )),
            _ => None,
        }
    }

    fn static_hint(&self) -> Option<&'static str> {
        match self {
            Error::Key(_) => Some(
                "Generate a key with: openssl rand -base64 32 — and start the server with the \
                 same ENCRYPTION_KEY as the gateway in its environment (see the README, \
                 \"Configuring the key\").",
            ),
            Error::Token(Base64Error::Unauthenticated) => Some(
                "The token was written under another key: check that ENCRYPTION_KEY matches the \
                 gateway's (compare provider_keys_encrypt_fingerprint()), or list the key it was \
                 written under in the server's ENCRYPTION_KEY_PREVIOUS.",
            ),
            Error::Token(Base64Error::NotBase64 | Base64Error::TooShort) => Some(
                "A token is standard base64 (with padding) of nonce(12) || tag(16) || ciphertext.",
            ),
            Error::Llmgw(LlmgwError::MissingSecret) => Some(
                "Start the server with the gateway's GATEWAY_API_KEY_HASH_SECRET in its \
                 environment (see the README, \"Configuring the key\").",
            ),
            Error::Llmgw(LlmgwError::UnknownKeyId(_)) => Some(
                "Add the secret that key id belongs to (the gateway's previous secret) after the \
                 current one in GATEWAY_API_KEY_HASH_SECRET, comma-separated.",
            ),
            Error::Guard(GuardError::Refused {
                format: Format::Llmgw,
                ..
            }) => Some(
                "Write token NULL and the key sealed in token_ciphertext, token_hash and \
                 token_masked (llmgw_encrypt_token(), llmgw_token_hash() and llmgw_mask_token() \
                 in SQL), or give the guard mode=encrypt to move such writes instead.",
            ),
            Error::Guard(GuardError::Refused { .. }) => Some(
                "Write the key encrypted (the gateway's ENCRYPTION_KEY, or encrypt_token() in \
                 SQL), or give the guard mode=encrypt to encrypt such writes instead.",
            ),
            Error::Guard(GuardError::Argument(_)) => Some(
                "The guard's arguments are mode=encrypt|reject, unverified=plaintext|keep and \
                 format=base64|llmgw, each at most once; none gives the defaults (mode=encrypt, \
                 format=base64, unverified=plaintext; for format=llmgw unverified=keep).",
            ),
            Error::Guard(GuardError::Protocol) => Some(
                "CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, \
                 status ON <table> FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard(); \
                 for the llmgw layout: BEFORE INSERT OR UPDATE OF id, token ... \
                 provider_keys_encrypt_guard('format=llmgw').",
            ),
            _ => None,
        }
    }

    /// Raise as a PostgreSQL ERROR. Does not return.
    pub fn raise(self) -> ! {
        // The statement that caused any of these errors may hold the value refused (a
        // plaintext key written past a guard, an input too long to encrypt): keep it out of
        // the server log (log_filter.rs). The client still gets the whole report.
        log_filter::hide_statement_of_next(self.sqlstate());
        let mut report =
            ErrorReport::new(self.sqlstate(), self.to_string(), "provider_keys_encrypt");
        if let Some(h) = self.hint() {
            report = report.set_hint(h);
        }
        if let Some(d) = self.detail() {
            report = report.set_detail(d);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Why the extension refuses to work in this server at all (checked at first use in each
/// backend, `settings::check_setup`). Messages name settings, roles, databases and functions, never a
/// value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    #[error(
        "provider_keys_encrypt is not in shared_preload_libraries: it works only when loaded at \
         server start, so that no session can store a key before its settings refuse it"
    )]
    NotPreloaded,
    /// A key was given where PostgreSQL stored or applied it before the check hook could
    /// refuse it. `place` says where, `fix` how to remove it.
    #[error(
        "a provider_keys_encrypt key is set in {place}; keys are read only from the server's \
         environment, and provider_keys_encrypt refuses to work until it is removed"
    )]
    KeyGiven {
        place: String,
        fix: String,
        more: usize,
    },
    #[error("could not check the catalogs for stored provider_keys_encrypt keys")]
    Scan,
}

/// Where PostgreSQL applied a value before any statement could be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigPlace {
    /// postgresql.conf, an included file, or postgresql.auto.conf
    File,
    /// `-c name=value` on the server's command line
    CommandLine,
}

/// Each constructor takes the name of the setting that holds the key.
impl SetupError {
    pub fn given_in_config(name: &str, place: ConfigPlace) -> SetupError {
        let (place, fix) = match place {
            ConfigPlace::File => (
                format!("a configuration file ({name} in postgresql.conf, an included file or postgresql.auto.conf)"),
                format!(
                    "Remove that line (postgresql.auto.conf: ALTER SYSTEM RESET {name}) and \
                     restart the server. If the library was not preloaded while the line was \
                     there, any role could read the key with SHOW: then rotate it."
                ),
            ),
            ConfigPlace::CommandLine => (
                format!("the server's command line (-c {name}=…)"),
                "Restart the server without it. Every OS user can read a command line (ps), and \
                 without preloading any role could read it with SHOW: rotate that key."
                    .to_owned(),
            ),
        };
        SetupError::KeyGiven {
            place,
            fix,
            more: 0,
        }
    }

    /// `role`/`database` are quoted identifiers; `None` means all.
    pub fn in_role_setting(
        name: &str,
        role: Option<String>,
        database: Option<String>,
        more: usize,
    ) -> SetupError {
        let target = match (role, database) {
            (None, None) => "ROLE ALL".to_owned(),
            (Some(r), None) => format!("ROLE {r}"),
            (None, Some(d)) => format!("DATABASE {d}"),
            (Some(r), Some(d)) => format!("ROLE {r} IN DATABASE {d}"),
        };
        SetupError::KeyGiven {
            place: format!(
                "pg_db_role_setting, which every role can read (ALTER {target} SET {name})"
            ),
            fix: format!(
                "Remove it (ALTER {target} RESET {name}); every role could read it, so treat \
                 that key as exposed and rotate it."
            ),
            more,
        }
    }

    /// `function` is the function's signature (`regprocedure` text).
    pub fn in_function(name: &str, function: String, more: usize) -> SetupError {
        SetupError::KeyGiven {
            place: format!(
                "the SET clause of function {function}, which every role can read in pg_proc.proconfig"
            ),
            fix: format!(
                "Remove it (ALTER ROUTINE {function} RESET {name}); every role could read it, \
                 so treat that key as exposed and rotate it."
            ),
            more,
        }
    }
}

impl From<ArgumentError> for GuardError {
    fn from(e: ArgumentError) -> GuardError {
        GuardError::Argument(e.0)
    }
}

impl From<ArgumentError> for Error {
    fn from(e: ArgumentError) -> Error {
        GuardError::from(e).into()
    }
}

/// `result.or_raise()`: the value, or the error raised with its SQLSTATE.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: Into<Error>> OrRaise<T> for Result<T, E> {
    #[inline]
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.into().raise(),
        }
    }
}
