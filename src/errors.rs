//! One error type for everything the SQL surface can raise, each cause with its own SQLSTATE.
//!
//! | cause                                   | SQLSTATE | condition name                   |
//! |-----------------------------------------|----------|----------------------------------|
//! | no key configured                       | 55000    | object_not_in_prerequisite_state |
//! | key not 32 bytes of base64              | 22023    | invalid_parameter_value          |
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
//! Messages are fixed strings or name a setting: never a key, a token or a plaintext.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

use crate::keys::KeyError;
use crate::token::TokenError;
use provider_keys_encrypt_core::format_llmgw::LlmgwError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The gateway's llmgw format and its GATEWAY_API_KEY_HASH_SECRET keyring.
    #[error(transparent)]
    Llmgw(#[from] LlmgwError),
    /// An llmgw token is bound to its row's id: there is no token for a NULL id.
    #[error("id must not be NULL: an llmgw token is bound to its row's id")]
    NullRowId,
}

impl Error {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Error::Key(KeyError::Missing) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Error::Key(KeyError::Invalid(_)) => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::Token(TokenError::NotBase64 | TokenError::TooShort) => {
                ERRCODE_INVALID_TEXT_REPRESENTATION
            }
            Error::Token(TokenError::Unauthenticated) => ERRCODE_DATA_EXCEPTION,
            Error::Token(TokenError::NotText) => ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            Error::Token(TokenError::TooLong | TokenError::TokenTooLong) => {
                ERRCODE_PROGRAM_LIMIT_EXCEEDED
            }
            Error::Token(TokenError::OutOfMemory) => ERRCODE_OUT_OF_MEMORY,
            Error::Token(TokenError::NoRandomness) => ERRCODE_SYSTEM_ERROR,
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
            Error::NullRowId => ERRCODE_NULL_VALUE_NOT_ALLOWED,
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::Key(_) => Some(
                "Generate a key with: openssl rand -base64 32 — and give the server the same \
                 ENCRYPTION_KEY as the gateway (see the README, \"Configuring the key\").",
            ),
            Error::Token(TokenError::Unauthenticated) => Some(
                "The token was written under another key: check that ENCRYPTION_KEY matches the \
                 gateway's (compare provider_keys_encrypt_fingerprint()), or add the key it was \
                 written under to provider_keys_encrypt.previous_keys.",
            ),
            Error::Token(TokenError::NotBase64 | TokenError::TooShort) => Some(
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
            _ => None,
        }
    }

    /// Raise as a PostgreSQL ERROR. Does not return.
    pub fn raise(self) -> ! {
        let mut report =
            ErrorReport::new(self.sqlstate(), self.to_string(), "provider_keys_encrypt");
        if let Some(h) = self.hint() {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
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
