//! What the guard trigger (`provider_keys_encrypt_guard()`) decides for a row, without
//! PostgreSQL: its arguments, the columns each format reads and writes, and the decision
//! (pass, seal, refuse) for a row's token. The trigger itself (reading and rewriting the tuple,
//! the keyrings, the WARNING) is the extension's `src/guard.rs`.
//!
//! Both formats decide the same way, from the token's [`State`]:
//!
//! | state                    | `mode=encrypt`                   | `mode=reject`           |
//! |--------------------------|----------------------------------|-------------------------|
//! | current / previous key   | pass                             | pass                    |
//! | plaintext                | seal                             | refuse                  |
//! | unverified, `unverified=keep`      | pass, warned           | pass, warned            |
//! | unverified, `unverified=plaintext` | seal, warned           | refuse                  |
//!
//! base64 classifies a token with its keyring (the engine's test). llmgw needs no key to
//! decide: a value in `token` is [`State::Unverified`] when it is a token (the `llmgw:` prefix,
//! or one of this extension's base64 tokens) and [`State::Plaintext`] otherwise; a NULL
//! `token` passes without a look (the gateway's new code and the engine's own backfill write
//! it, so a run pays nothing for the guard).

use crate::format::{llmgw, Format, State};

/// How a base64 value in state [`State::Unverified`] is described in the guard's WARNING: the
/// engine's words (`unverified_text` of every base64 mode in src/engine/modes.sql; a
/// `#[pg_test]` keeps the two equal).
pub const UNVERIFIED_BASE64: &str = "looks like a token but authenticates under no configured key";

/// What the guard does with a plaintext token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Encrypt it on write (the default: the application keeps working).
    Encrypt,
    /// Refuse the write (23000).
    Reject,
}

/// What the guard does with a value in state [`State::Unverified`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unverified {
    /// Treat it as plaintext (encrypt it, or refuse it in mode=reject), with a WARNING.
    Plaintext,
    /// Write it as given, with a WARNING.
    Keep,
}

/// A guard's settings, from its trigger arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    pub format: Format,
    pub unverified: Unverified,
}

/// An unknown, malformed or repeated trigger argument. The text may quote the argument
/// (clipped), which is not secret: it is in `pg_trigger` for everyone to read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArgumentError(pub String);

impl Config {
    pub const DEFAULT: Config = Config {
        mode: Mode::Encrypt,
        format: Format::Base64,
        unverified: Unverified::Plaintext,
    };

    /// Parse trigger arguments: `mode=encrypt|reject`, `format=base64|llmgw`,
    /// `unverified=plaintext|keep`, each at most once, in any order. Without `unverified`, the
    /// format's default: `plaintext` for base64, `keep` for llmgw (the engine's treatment: an
    /// llmgw token in `token` is never sealed twice).
    pub fn parse<'a>(args: impl IntoIterator<Item = &'a [u8]>) -> Result<Config, ArgumentError> {
        let mut config = Config::DEFAULT;
        let mut unverified = None;
        let mut seen = [false; 3];
        for arg in args {
            let text = std::str::from_utf8(arg)
                .map_err(|_| ArgumentError("an argument is not valid UTF-8".into()))?;
            let unknown = || ArgumentError(format!("unknown argument \"{}\"", clip(text, 64)));
            let (key, value) = text.split_once('=').ok_or_else(unknown)?;
            let slot = match key {
                "mode" => 0,
                "format" => 1,
                "unverified" => 2,
                _ => return Err(unknown()),
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(ArgumentError(format!(
                    "argument \"{key}\" is given more than once"
                )));
            }
            match (key, value) {
                ("mode", "encrypt") => config.mode = Mode::Encrypt,
                ("mode", "reject") => config.mode = Mode::Reject,
                ("format", name) => config.format = Format::from_name(name).ok_or_else(unknown)?,
                ("unverified", "plaintext") => unverified = Some(Unverified::Plaintext),
                ("unverified", "keep") => unverified = Some(Unverified::Keep),
                _ => return Err(unknown()),
            }
        }
        config.unverified = unverified.unwrap_or(match config.format {
            Format::Base64 => Unverified::Plaintext,
            Format::Llmgw => Unverified::Keep,
        });
        Ok(config)
    }

    /// The labels the status function shows: (mode, format, unverified).
    pub fn labels(&self) -> (&'static str, &'static str, &'static str) {
        (
            match self.mode {
                Mode::Encrypt => "encrypt",
                Mode::Reject => "reject",
            },
            self.format.name(),
            match self.unverified {
                Unverified::Plaintext => "plaintext",
                Unverified::Keep => "keep",
            },
        )
    }
}

/// The columns the guard may read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    Id,
    Token,
    Provider,
    Status,
    TokenCiphertext,
    TokenHash,
    TokenMasked,
    OrganizationId,
}

impl Col {
    pub const ALL: [Col; 8] = [
        Col::Id,
        Col::Token,
        Col::Provider,
        Col::Status,
        Col::TokenCiphertext,
        Col::TokenHash,
        Col::TokenMasked,
        Col::OrganizationId,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Col::Id => "id",
            Col::Token => "token",
            Col::Provider => "provider",
            Col::Status => "status",
            Col::TokenCiphertext => "token_ciphertext",
            Col::TokenHash => "token_hash",
            Col::TokenMasked => "token_masked",
            Col::OrganizationId => "organization_id",
        }
    }

    /// The column of that name, if the guard knows it.
    pub fn from_name(name: &[u8]) -> Option<Col> {
        Col::ALL.into_iter().find(|c| c.name().as_bytes() == name)
    }
}

/// The columns whose UPDATE can bring a plaintext back: the guard must fire on an UPDATE of
/// each (`BEFORE INSERT OR UPDATE OF <these>`). A run walks the table in id order, so a
/// plaintext row given a smaller id would end behind it: id matters for both. base64 passes
/// soft-deleted rows, so an UPDATE of status (un-deleting a row) matters too; llmgw moves
/// every row whatever its status.
pub fn watches(format: Format) -> &'static [&'static str] {
    match format {
        Format::Base64 => &["id", "token", "status"],
        Format::Llmgw => &["id", "token"],
    }
}

/// The columns the guard reads or writes: each must exist and be text or varchar.
pub fn required(format: Format) -> &'static [Col] {
    match format {
        Format::Base64 => &[Col::Id, Col::Token, Col::Provider, Col::Status],
        Format::Llmgw => &[
            Col::Id,
            Col::Token,
            Col::Provider,
            Col::TokenCiphertext,
            Col::TokenHash,
            Col::TokenMasked,
            Col::OrganizationId,
        ],
    }
}

/// What the guard does with a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write the row as given.
    Pass,
    /// Seal the token as a plaintext ([`Sealed::columns_to_write`] says where it goes).
    Seal,
    /// mode=reject: refuse the write; why (never the value).
    Refuse(&'static str),
}

/// What to do with a row whose token is in `state`, and whether the caller warns that it is
/// unverified. The same rule for both formats (the module's table); only the words of a
/// refusal differ.
pub fn decide(config: &Config, state: State) -> (Decision, bool) {
    let unverified = state == State::Unverified;
    let treat_as_plaintext = match state {
        State::Current | State::Previous => false,
        State::Unverified => config.unverified == Unverified::Plaintext,
        State::Plaintext => true,
    };
    if !treat_as_plaintext {
        return (Decision::Pass, unverified);
    }
    match config.mode {
        Mode::Reject => (Decision::Refuse(refusal(config.format, unverified)), false),
        Mode::Encrypt => (Decision::Seal, unverified),
    }
}

/// Why mode=reject refused a row (never the value).
fn refusal(format: Format, unverified: bool) -> &'static str {
    match (format, unverified) {
        (Format::Base64, true) => {
            "its token looks encrypted but authenticates under no configured key"
        }
        (Format::Base64, false) => "its token is not encrypted",
        (Format::Llmgw, true) => {
            "its column token holds a token (llmgw, or base64 of this extension), not a key"
        }
        (Format::Llmgw, false) => "its column token holds a plaintext key",
    }
}

/// llmgw: the state of a non-NULL `token` for the guard, without a key: a token (the
/// `llmgw:` prefix, or one `base64_token` recognises as this extension's base64 token, as the
/// engine's llmgw_state does) is [`State::Unverified`], anything else [`State::Plaintext`].
pub fn llmgw_token_state(token: &[u8], base64_token: impl FnOnce(&[u8]) -> bool) -> State {
    if token.starts_with(llmgw::PREFIX.as_bytes()) || base64_token(token) {
        State::Unverified
    } else {
        State::Plaintext
    }
}

/// What the guard sealed from one plaintext.
#[derive(Debug)]
pub enum Sealed {
    /// base64: the token for column `token`.
    Token(String),
    /// llmgw: what the engine's backfill writes for the row.
    Llmgw {
        ciphertext: String,
        hash: String,
        masked: String,
    },
}

impl Sealed {
    /// The columns a sealed row writes (None: set NULL). llmgw moves the plaintext out of
    /// `token`, so that the gateway's `CHECK ((token IS NULL) <> (token_ciphertext IS NULL))`
    /// holds.
    pub fn columns_to_write(self) -> Vec<(Col, Option<String>)> {
        match self {
            Sealed::Token(token) => vec![(Col::Token, Some(token))],
            Sealed::Llmgw {
                ciphertext,
                hash,
                masked,
            } => vec![
                (Col::Token, None),
                (Col::TokenCiphertext, Some(ciphertext)),
                (Col::TokenHash, Some(hash)),
                (Col::TokenMasked, Some(masked)),
            ],
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (for names in messages).
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ArgumentError> {
        Config::parse(args.iter().map(|a| a.as_bytes()))
    }

    #[test]
    fn arguments() {
        assert_eq!(parse(&[]), Ok(Config::DEFAULT));
        let reject = parse(&["unverified=keep", "mode=reject", "format=base64"]).unwrap();
        assert_eq!(reject.labels(), ("reject", "base64", "keep"));
        for bad in [
            &["reject"][..],
            &["mode=Reject"],
            &["mode=reject", "mode=encrypt"],
            &["format=llmgw", "format=base64"],
            &["format=LLMGW"],
            &["unverified=encrypt"],
            &["mode="],
            &[""],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(1000);
        let msg = parse(&[&long]).unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
        assert!(Config::parse([b"mode=\xff".as_slice()]).is_err());
        assert_eq!(
            parse(&["mode=reject", "mode=encrypt"]).unwrap_err().0,
            "argument \"mode\" is given more than once"
        );
    }

    #[test]
    fn llmgw_arguments_and_defaults() {
        let llmgw = parse(&["format=llmgw"]).unwrap();
        // the engine's treatment: an llmgw token in `token` is never sealed twice
        assert_eq!(llmgw.labels(), ("encrypt", "llmgw", "keep"));
        assert_eq!(
            parse(&["unverified=plaintext", "format=llmgw", "mode=reject"])
                .unwrap()
                .labels(),
            ("reject", "llmgw", "plaintext")
        );
        // the default follows the format wherever the format argument comes
        assert_eq!(
            parse(&["mode=reject", "format=llmgw"]).unwrap().unverified,
            Unverified::Keep
        );
        assert_eq!(
            parse(&["format=base64"]).unwrap().unverified,
            Unverified::Plaintext
        );
        assert_eq!(watches(Format::Base64), &["id", "token", "status"]);
        assert_eq!(watches(Format::Llmgw), &["id", "token"]);
        assert!(!required(Format::Llmgw).contains(&Col::Status));
        assert!(required(Format::Llmgw).contains(&Col::OrganizationId));
        for col in Col::ALL {
            assert_eq!(Col::from_name(col.name().as_bytes()), Some(col));
        }
        assert_eq!(Col::from_name(b"Token"), None);
    }

    #[test]
    fn base64_decisions() {
        use Decision::*;
        let config = |args: &[&str]| parse(args).unwrap();
        let encrypt = config(&[]);
        let keep = config(&["unverified=keep"]);
        let reject = config(&["mode=reject"]);
        let reject_keep = config(&["mode=reject", "unverified=keep"]);
        for (config, state, expected) in [
            (&encrypt, State::Current, (Pass, false)),
            (&encrypt, State::Previous, (Pass, false)),
            (&reject, State::Previous, (Pass, false)),
            (&encrypt, State::Plaintext, (Seal, false)),
            (
                &reject,
                State::Plaintext,
                (Refuse("its token is not encrypted"), false),
            ),
            (&encrypt, State::Unverified, (Seal, true)),
            (&keep, State::Unverified, (Pass, true)),
            (&reject_keep, State::Unverified, (Pass, true)),
            (
                &reject,
                State::Unverified,
                (
                    Refuse("its token looks encrypted but authenticates under no configured key"),
                    false,
                ),
            ),
        ] {
            assert_eq!(decide(config, state), expected, "{config:?} {state:?}");
        }
    }

    #[test]
    fn llmgw_decisions() {
        use Decision::*;
        let config = |args: &[&str]| parse(args).unwrap();
        let encrypt = config(&["format=llmgw"]);
        let encrypt_all = config(&["format=llmgw", "unverified=plaintext"]);
        let reject = config(&["format=llmgw", "mode=reject"]);
        let reject_all = config(&["format=llmgw", "mode=reject", "unverified=plaintext"]);
        let token = b"llmgw:v2:0123abcd:aa:bb:cc".as_slice();
        let plain = b"sk-live-1234567890".as_slice();
        let decide_llmgw =
            |config: &Config, t: &[u8]| decide(config, llmgw_token_state(t, |_| false));
        for (config, input, expected) in [
            // a plaintext: sealed, or refused
            (&encrypt, plain, (Seal, false)),
            (&encrypt_all, plain, (Seal, false)),
            (
                &reject,
                plain,
                (Refuse("its column token holds a plaintext key"), false),
            ),
            (&encrypt, b"".as_slice(), (Seal, false)),
            (&encrypt, b"\xff\xfe".as_slice(), (Seal, false)),
            // an llmgw token in `token`: warned about, then per unverified
            (&encrypt, token, (Pass, true)),
            (&reject, token, (Pass, true)),
            (&encrypt_all, token, (Seal, true)),
            (
                &reject_all,
                token,
                (
                    Refuse("its column token holds a token (llmgw, or base64 of this extension), not a key"),
                    false,
                ),
            ),
            // the prefix is exact: anything else is a plaintext
            (&encrypt, b"LLMGW:v2:x".as_slice(), (Seal, false)),
            (&encrypt, b"llmgw".as_slice(), (Seal, false)),
        ] {
            assert_eq!(decide_llmgw(config, input), expected, "{config:?} {input:?}");
        }
        // a base64 token of this extension in `token` is treated as an llmgw token is
        let b64 = b"c2VhbGVkIGJ5IHRoaXMgZXh0ZW5zaW9u".as_slice();
        assert_eq!(llmgw_token_state(b64, |_| true), State::Unverified);
        assert_eq!(llmgw_token_state(b64, |_| false), State::Plaintext);
        // the prefix alone decides: the base64 check is not asked then
        assert_eq!(
            llmgw_token_state(token, |_| unreachable!()),
            State::Unverified
        );
    }

    #[test]
    fn sealed_llmgw_moves_the_plaintext_out_of_token() {
        let writes = Sealed::Llmgw {
            ciphertext: "llmgw:v2:k:i:c:t".into(),
            hash: "h".into(),
            masked: "m".into(),
        }
        .columns_to_write();
        assert_eq!(
            writes,
            vec![
                (Col::Token, None),
                (Col::TokenCiphertext, Some("llmgw:v2:k:i:c:t".into())),
                (Col::TokenHash, Some("h".into())),
                (Col::TokenMasked, Some("m".into())),
            ]
        );
        assert_eq!(
            Sealed::Token("t".into()).columns_to_write(),
            vec![(Col::Token, Some("t".into()))]
        );
    }

    #[test]
    fn clip_cuts_at_char_boundaries() {
        assert_eq!(clip("ключ", 3), "к");
        assert_eq!(clip("abc", 10), "abc");
    }
}
