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
//! by the same rules as the environment's keys: one parser.
//!
//! Errors name a line number or a variable, never a byte of a value.

use zeroize::Zeroizing;

use crate::keys::env_text;

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
    Ok(vars)
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
        let eq = parse(format!("ENCRYPTION_KEY={K1}=x").as_bytes()).unwrap();
        assert_eq!(text(&eq.current), Some(format!("{K1}=x").as_str()));
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
    fn values_decode_as_the_environment_does() {
        // bytes that are not UTF-8 become U+FFFD, as Node reads process.env
        let v = parse(b"GATEWAY_API_KEY_HASH_SECRET=a\xffb").unwrap();
        assert_eq!(text(&v.gateway), Some("a\u{fffd}b"));
        assert_eq!(unquote(b"'x'"), b"x");
        assert_eq!(unquote(b"'x\""), b"'x\"");
        assert_eq!(unquote(b"'"), b"'");
    }
}
