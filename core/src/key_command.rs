//! What `provider_keys_encrypt.key_command` prints: the key variables, one per line, as the
//! server's environment carries them.
//!
//! ```text
//! ENCRYPTION_KEY=<base64 key>
//! ENCRYPTION_KEY_PREVIOUS=<key>,<key>
//! GATEWAY_API_KEY_HASH_SECRET = '<secret>,<older secret>'     # Debian's environment-file form
//! ```
//!
//! Each line is `NAME=value` or `NAME = 'value'` (spaces around `=` allowed, the value in one
//! pair of single or double quotes or none, a trailing `\r` dropped). Blank lines and lines
//! starting with `#` are skipped, and so are variables of other names (a Debian environment
//! file may carry them). A name given twice, a line without `=`, or output naming none of the
//! three variables is refused whole: a keyring is never built from part of an output. The
//! values are decoded exactly as the environment's ([`crate::keys::env_text`]) and then parse
//! by the same rules as the environment's keys: one parser. [`parse`] also builds the keyrings
//! once, so an output whose keys do not parse (an empty value, a key that is not 32 bytes, a
//! gateway secret list with no secret) is refused before it can replace keys that worked.
//!
//! Errors name a line number or a variable, never a byte of a value.

use zeroize::Zeroizing;

use crate::format::{base64, llmgw};
use crate::keys::{env_text, parse_key_list, KeySource};

/// The largest output read (the same bound as a key file's).
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// The variables a key command may set, in the order of [`KeyCommandVars`].
pub const NAMES: [&str; 3] = [
    "ENCRYPTION_KEY",
    "ENCRYPTION_KEY_PREVIOUS",
    "GATEWAY_API_KEY_HASH_SECRET",
];

/// The key variables a command printed (`None`: not printed).
#[derive(Default)]
pub struct KeyCommandVars {
    pub current: Option<Zeroizing<String>>,
    pub previous: Option<Zeroizing<String>>,
    pub gateway: Option<Zeroizing<String>>,
}

/// Why a key command's keys were not taken. Never holds a byte of its output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyCommandError {
    #[error("provider_keys_encrypt.key_command could not be started: {0}")]
    Spawn(String),
    #[error("provider_keys_encrypt.key_command failed: {0}")]
    Failed(String),
    #[error("provider_keys_encrypt.key_command did not finish within {0} ms and was killed")]
    TimedOut(u64),
    #[error("provider_keys_encrypt.key_command printed more than 65536 bytes")]
    TooLarge,
    #[error("provider_keys_encrypt.key_command printed a line that is not NAME=value (line {0})")]
    Malformed(usize),
    #[error("provider_keys_encrypt.key_command printed {0} more than once")]
    Duplicate(&'static str),
    #[error(
        "provider_keys_encrypt.key_command printed none of ENCRYPTION_KEY, \
         ENCRYPTION_KEY_PREVIOUS and GATEWAY_API_KEY_HASH_SECRET"
    )]
    NoKeys,
    #[error("provider_keys_encrypt.key_command printed {0}, which is refused: {1}")]
    Invalid(&'static str, String),
    /// A parallel worker did not find the keys its leader's statement runs under: the key
    /// command gave new keys several times while the statement ran.
    #[error(
        "the keys from provider_keys_encrypt.key_command changed while this statement ran, and a \
         parallel worker no longer finds the ones it started with; run the statement again"
    )]
    Moved,
    /// Set by a reload that no statement needing a key has followed yet.
    #[error(
        "provider_keys_encrypt.key_command has not run since it was set: it runs at the next \
         statement that needs a key"
    )]
    NotRun,
}

impl KeyCommandError {
    /// The error as plain parts (a kind, a number, a text) for shared memory, where the
    /// server keeps the last run's error for every backend. [`KeyCommandError::from_parts`]
    /// gives it back.
    pub fn to_parts(&self) -> (u8, u64, String) {
        let name = |n: &str| NAMES.iter().position(|x| *x == n).unwrap_or(0) as u64;
        match self {
            KeyCommandError::Spawn(s) => (1, 0, s.clone()),
            KeyCommandError::Failed(s) => (2, 0, s.clone()),
            KeyCommandError::TimedOut(ms) => (3, *ms, String::new()),
            KeyCommandError::TooLarge => (4, 0, String::new()),
            KeyCommandError::Malformed(line) => (5, *line as u64, String::new()),
            KeyCommandError::Duplicate(n) => (6, name(n), String::new()),
            KeyCommandError::NoKeys => (7, 0, String::new()),
            KeyCommandError::Invalid(n, why) => (8, name(n), why.clone()),
            KeyCommandError::Moved => (9, 0, String::new()),
            KeyCommandError::NotRun => (10, 0, String::new()),
        }
    }

    /// The error [`KeyCommandError::to_parts`] gave; `None` for parts it cannot have given.
    pub fn from_parts(kind: u8, number: u64, text: String) -> Option<KeyCommandError> {
        let name = || NAMES.get(usize::try_from(number).ok()?).copied();
        Some(match kind {
            1 => KeyCommandError::Spawn(text),
            2 => KeyCommandError::Failed(text),
            3 => KeyCommandError::TimedOut(number),
            4 => KeyCommandError::TooLarge,
            5 => KeyCommandError::Malformed(usize::try_from(number).ok()?),
            6 => KeyCommandError::Duplicate(name()?),
            7 => KeyCommandError::NoKeys,
            8 => KeyCommandError::Invalid(name()?, text),
            9 => KeyCommandError::Moved,
            10 => KeyCommandError::NotRun,
            _ => return None,
        })
    }
}

/// Parse a command's output (see the module doc).
pub fn parse(output: &[u8]) -> Result<KeyCommandVars, KeyCommandError> {
    if output.len() > MAX_OUTPUT_BYTES {
        return Err(KeyCommandError::TooLarge);
    }
    let mut vars = KeyCommandVars::default();
    for (i, line) in output.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() || trimmed.starts_with(b"#") {
            continue;
        }
        let eq = trimmed
            .iter()
            .position(|b| *b == b'=')
            .ok_or(KeyCommandError::Malformed(i + 1))?;
        let name = trimmed[..eq].trim_ascii();
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_') {
            return Err(KeyCommandError::Malformed(i + 1));
        }
        let Some(slot) = NAMES.iter().position(|n| n.as_bytes() == name) else {
            continue; // another variable: not ours
        };
        let value = unquote(trimmed[eq + 1..].trim_ascii());
        let target = match slot {
            0 => &mut vars.current,
            1 => &mut vars.previous,
            _ => &mut vars.gateway,
        };
        if target.is_some() {
            return Err(KeyCommandError::Duplicate(NAMES[slot]));
        }
        *target = Some(env_text(value.to_vec()));
    }
    if vars.current.is_none() && vars.previous.is_none() && vars.gateway.is_none() {
        return Err(KeyCommandError::NoKeys);
    }
    validate(&vars)?;
    Ok(vars)
}

/// Build each keyring the output gives once, by the environment's rules, and refuse the whole
/// output if one does not build (never naming a value). A printed variable may not be empty:
/// in a command's output an empty value is a mistake, not "unset".
fn validate(vars: &KeyCommandVars) -> Result<(), KeyCommandError> {
    let printed = [&vars.current, &vars.previous, &vars.gateway];
    for (name, value) in NAMES.iter().zip(printed) {
        if value.as_ref().is_some_and(|v| v.trim_ascii().is_empty()) {
            return Err(KeyCommandError::Invalid(name, "its value is empty".into()));
        }
    }
    fn text(v: &Option<Zeroizing<String>>) -> Option<&str> {
        v.as_ref().map(|s| s.as_str())
    }
    match (text(&vars.current), text(&vars.previous)) {
        (Some(current), previous) => {
            if let Err(e) = base64::Keyring::build(Some(current), previous) {
                // which of the two: the current key alone tells
                let name = if base64::Keyring::build(Some(current), None).is_err() {
                    NAMES[0]
                } else {
                    NAMES[1]
                };
                return Err(KeyCommandError::Invalid(name, e.to_string()));
            }
        }
        (None, Some(previous)) => {
            if let Some(Err(e)) =
                parse_key_list(previous, KeySource::EnvironmentPrevious).find(Result::is_err)
            {
                return Err(KeyCommandError::Invalid(NAMES[1], e.to_string()));
            }
        }
        (None, None) => {}
    }
    if let Some(gateway) = text(&vars.gateway) {
        if let Err(e) = llmgw::Keyring::parse(gateway) {
            return Err(KeyCommandError::Invalid(NAMES[2], e.to_string()));
        }
    }
    Ok(())
}

/// The value without one pair of enclosing single or double quotes.
fn unquote(value: &[u8]) -> &[u8] {
    match value {
        [q @ (b'\'' | b'"'), inner @ .., last] if last == q => inner,
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn text(v: &Option<Zeroizing<String>>) -> Option<&str> {
        v.as_ref().map(|s| s.as_str())
    }

    #[test]
    fn both_forms_and_what_is_skipped() {
        let out = format!(
            "# keys for the database\n\nENCRYPTION_KEY={K1}\r\n\
             ENCRYPTION_KEY_PREVIOUS = \"{K1}\"\nLANG=C.UTF-8\n\
             GATEWAY_API_KEY_HASH_SECRET = 'new, old'\n"
        );
        let v = parse(out.as_bytes()).unwrap();
        assert_eq!(text(&v.current), Some(K1));
        assert_eq!(text(&v.previous), Some(K1));
        assert_eq!(text(&v.gateway), Some("new, old"));
        let only = parse(b"GATEWAY_API_KEY_HASH_SECRET=s1").unwrap();
        assert_eq!(
            (text(&only.current), text(&only.gateway)),
            (None, Some("s1"))
        );
        // an '=' inside the value is the value's
        let eq = parse(b"GATEWAY_API_KEY_HASH_SECRET=s1=x").unwrap();
        assert_eq!(text(&eq.gateway), Some("s1=x"));
    }

    #[test]
    fn refusals_name_a_line_or_a_variable_never_a_value() {
        let secret = "sk-live-do-not-print-me";
        for (out, want) in [
            (
                format!("ENCRYPTION_KEY={K1}\n{secret}\n"),
                KeyCommandError::Malformed(2),
            ),
            (format!("{secret} = x"), KeyCommandError::Malformed(1)),
            (
                format!("ENCRYPTION_KEY={K1}\nENCRYPTION_KEY={secret}"),
                KeyCommandError::Duplicate("ENCRYPTION_KEY"),
            ),
            (
                format!("OTHER={secret}\n# nothing else\n"),
                KeyCommandError::NoKeys,
            ),
            (String::new(), KeyCommandError::NoKeys),
            ("x".repeat(MAX_OUTPUT_BYTES + 1), KeyCommandError::TooLarge),
        ] {
            let e = parse(out.as_bytes()).err().unwrap();
            assert_eq!(e, want);
            assert!(!e.to_string().contains(secret), "{e}");
        }
    }

    #[test]
    fn keys_that_do_not_build_refuse_the_whole_output() {
        let secret = "sk-live-do-not-print-me";
        for (out, name) in [
            (
                format!("ENCRYPTION_KEY=\nGATEWAY_API_KEY_HASH_SECRET={secret}"),
                NAMES[0],
            ),
            (format!("ENCRYPTION_KEY={secret}"), NAMES[0]),
            (
                format!("ENCRYPTION_KEY={K1}\nENCRYPTION_KEY_PREVIOUS={K1},{secret}"),
                NAMES[1],
            ),
            (format!("ENCRYPTION_KEY_PREVIOUS={secret}"), NAMES[1]),
            (
                format!("ENCRYPTION_KEY={K1}\nGATEWAY_API_KEY_HASH_SECRET=' , '"),
                NAMES[2],
            ),
            ("GATEWAY_API_KEY_HASH_SECRET=''".to_string(), NAMES[2]),
        ] {
            match parse(out.as_bytes()) {
                Err(e @ KeyCommandError::Invalid(n, _)) => {
                    assert_eq!(n, name, "{out}");
                    assert!(!e.to_string().contains(secret), "{e}");
                }
                other => panic!("{out}: {:?}", other.err()),
            }
        }
    }

    #[test]
    fn errors_travel_as_parts() {
        for e in [
            KeyCommandError::Spawn("not found".into()),
            KeyCommandError::Failed("exit status 3".into()),
            KeyCommandError::TimedOut(400),
            KeyCommandError::TooLarge,
            KeyCommandError::Malformed(7),
            KeyCommandError::Duplicate("GATEWAY_API_KEY_HASH_SECRET"),
            KeyCommandError::NoKeys,
            KeyCommandError::Invalid("ENCRYPTION_KEY", "its value is empty".into()),
            KeyCommandError::Moved,
            KeyCommandError::NotRun,
        ] {
            let (kind, number, text) = e.to_parts();
            assert_eq!(KeyCommandError::from_parts(kind, number, text), Some(e));
        }
        assert_eq!(KeyCommandError::from_parts(0, 0, String::new()), None);
        assert_eq!(KeyCommandError::from_parts(6, 9, String::new()), None);
    }

    #[test]
    fn values_decode_as_the_environment_does() {
        // bytes that are not UTF-8 become U+FFFD, as Node reads process.env
        let v = parse(b"GATEWAY_API_KEY_HASH_SECRET=a\xffb").unwrap();
        assert_eq!(text(&v.gateway), Some("a\u{fffd}b"));
        assert_eq!(unquote(b"'x'"), b"x");
        assert_eq!(unquote(b"'x\""), b"'x\"");
        assert_eq!(unquote(b"'"), b"'");
    }
}
