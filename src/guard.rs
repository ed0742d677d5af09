//! The guard: `provider_keys_encrypt_guard()`, a trigger that keeps plaintext out of a
//! provider_key table while something still writes it (gateway instances on old code during a
//! rolling deploy, an admin script, a restored row).
//!
//! ```sql
//! CREATE TRIGGER provider_keys_encrypt_guard
//!     BEFORE INSERT OR UPDATE OF token, status ON provider_key
//!     FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard();   -- or ('mode=reject')
//! ```
//!
//! For each row written (the new version of the row):
//! * `status = 'deleted'`, or a NULL token: written as given.
//! * a token that authenticates under the current or a previous key: written as given (the
//!   same test as the engine's: `KeyRing::classify`, so `reencrypt_provider_keys` and the guard
//!   agree on what is encrypted).
//! * plaintext: `mode=encrypt` (the default) writes it encrypted under the current key, in the
//!   format the gateway reads; `mode=reject` raises 23000 naming the row's id, never the value.
//! * token-shaped but no key opens it (`unverified`): the engine's treatment, a WARNING naming
//!   the row, then as plaintext (`unverified=plaintext`, the default) or written as given
//!   (`unverified=keep`).
//!
//! The guard runs no SQL: it reads the row's columns straight from the tuple, so nothing on
//! anyone's search_path (a planted operator or overload) can run through it.
//!
//! Arguments are `key=value`, each key at most once; anything else is an error (22023) the
//! first time the trigger fires. `format=base64` is the only format today. Adding the
//! gateway's llmgw format means a `Format::Llmgw` variant here and its branch in
//! [`Format::columns_to_write`] (it reads `token` and writes `token_ciphertext`, `token_hash`
//! and `token_masked`); the decision (pass / seal / refuse) does not change.
//!
//! The engine's own writes: `UPDATE ... SET token = encrypt_token(t.token)` fires the guard on
//! the token this backend has just sealed. [`note_sealed`] keeps the last token sealed in this
//! backend and the fingerprint of the key it was sealed under; a token equal to it byte for
//! byte, while that key is still the current key, is known to authenticate under the current
//! key and is passed without opening it again.

use std::cell::{Cell, RefCell};
use std::ffi::CStr;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode, PgTupleDesc};

use crate::errors::{Error, GuardError, OrRaise};
use crate::gucs::with_keyring;
use crate::keys::{KeyRing, TokenState};

/// What the guard does with a plaintext token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Encrypt it on write (the default: the application keeps working).
    Encrypt,
    /// Refuse the write (23000).
    Reject,
}

/// The token format the guard writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// base64(nonce ‖ tag ‖ ciphertext) in `token`, key ENCRYPTION_KEY (the seed guide's).
    Base64,
}

/// What the guard does with a token-shaped value that no configured key opens.
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

impl Config {
    pub const DEFAULT: Config = Config {
        mode: Mode::Encrypt,
        format: Format::Base64,
        unverified: Unverified::Plaintext,
    };

    /// Parse trigger arguments: `mode=encrypt|reject`, `format=base64`,
    /// `unverified=plaintext|keep`, each at most once, in any order.
    pub fn parse<'a>(args: impl IntoIterator<Item = &'a [u8]>) -> Result<Config, GuardError> {
        let mut config = Config::DEFAULT;
        let mut seen = [false; 3];
        for arg in args {
            let text = std::str::from_utf8(arg)
                .map_err(|_| GuardError::Argument("an argument is not valid UTF-8".into()))?;
            let unknown =
                || GuardError::Argument(format!("unknown argument \"{}\"", clip(text, 64)));
            let (key, value) = text.split_once('=').ok_or_else(unknown)?;
            let slot = match key {
                "mode" => 0,
                "format" => 1,
                "unverified" => 2,
                _ => return Err(unknown()),
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(GuardError::Argument(format!(
                    "argument \"{key}\" is given more than once"
                )));
            }
            match (key, value) {
                ("mode", "encrypt") => config.mode = Mode::Encrypt,
                ("mode", "reject") => config.mode = Mode::Reject,
                ("format", "base64") => config.format = Format::Base64,
                ("unverified", "plaintext") => config.unverified = Unverified::Plaintext,
                ("unverified", "keep") => config.unverified = Unverified::Keep,
                _ => return Err(unknown()),
            }
        }
        Ok(config)
    }

    /// The labels the status function shows: (mode, format, unverified).
    pub fn labels(&self) -> (&'static str, &'static str, &'static str) {
        (
            match self.mode {
                Mode::Encrypt => "encrypt",
                Mode::Reject => "reject",
            },
            match self.format {
                Format::Base64 => "base64",
            },
            match self.unverified {
                Unverified::Plaintext => "plaintext",
                Unverified::Keep => "keep",
            },
        )
    }
}

impl Format {
    /// The columns a sealed row writes, given the token sealed from the plaintext in `token`.
    /// base64: the token column itself. (llmgw, to come: token_ciphertext, token_hash and
    /// token_masked, with the plaintext moved out of `token`.)
    fn columns_to_write(self, columns: &Columns, sealed: String) -> Vec<(i32, String)> {
        match self {
            Format::Base64 => vec![(columns.token, sealed)],
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (for names in messages).
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// The last token sealed in this backend (the engine's own writes) and two counters for tests.

struct Sealed {
    /// Fingerprint of the key the token was sealed under (the current key at the time).
    fingerprint: String,
    token: String,
}

thread_local! {
    static LAST_SEALED: RefCell<Sealed> = const {
        RefCell::new(Sealed { fingerprint: String::new(), token: String::new() })
    };
    /// (tokens passed as just sealed, tokens the guard classified in full)
    static COUNTS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Remember `token`, just sealed under `ring`'s current key in this backend: when the guard
/// sees exactly these bytes next, it need not open them again. Called by encrypt_token,
/// pke_internal.reencrypt and the guard itself. Tokens are not secret; the buffers are reused.
pub fn note_sealed(ring: &KeyRing, token: &str) {
    LAST_SEALED.with(|cell| {
        let Ok(mut last) = cell.try_borrow_mut() else {
            return;
        };
        last.token.clear();
        last.fingerprint.clear();
        let fingerprint = ring.current().fingerprint();
        // never abort the backend on memory: without room, remember nothing
        if last.token.try_reserve(token.len()).is_ok()
            && last.fingerprint.try_reserve(fingerprint.len()).is_ok()
        {
            last.token.push_str(token);
            last.fingerprint.push_str(fingerprint);
        }
    });
}

/// Is `token` the one this backend sealed last, under what is still the current key?
fn sealed_just_now(ring: &KeyRing, token: &[u8]) -> bool {
    LAST_SEALED.with(|cell| {
        cell.try_borrow().is_ok_and(|last| {
            !last.token.is_empty()
                && last.token.as_bytes() == token
                && last.fingerprint == ring.current().fingerprint()
        })
    })
}

/// (tokens the guard passed as just sealed, tokens it classified in full) in this backend.
pub fn counts() -> (u64, u64) {
    COUNTS.with(Cell::get)
}

fn count(just_sealed: bool) {
    COUNTS.with(|c| {
        let (fast, full) = c.get();
        c.set(if just_sealed {
            (fast + 1, full)
        } else {
            (fast, full + 1)
        });
    });
}

// ---------------------------------------------------------------------------------------------
// The decision for one row: pure Rust over the row's token bytes.

enum Outcome {
    /// Write the row as given.
    Pass,
    /// Write this token instead of the plaintext.
    Seal(String),
    /// mode=reject: refuse the write; why (never the value).
    Refuse(&'static str),
}

/// What to do with a new token, and whether it is `unverified` (the caller warns).
fn decide(config: &Config, ring: &KeyRing, token: &[u8]) -> Result<(Outcome, bool), Error> {
    let just_sealed = sealed_just_now(ring, token);
    count(just_sealed);
    let state = if just_sealed {
        TokenState::Current
    } else {
        match std::str::from_utf8(token) {
            Ok(text) => ring.classify(text)?,
            Err(_) => TokenState::Plaintext, // not text, so not base64 either
        }
    };
    let unverified = state == TokenState::Unverified;
    let treat_as_plaintext = match state {
        TokenState::Current | TokenState::Previous => false,
        TokenState::Unverified => config.unverified == Unverified::Plaintext,
        TokenState::Plaintext => true,
    };
    if !treat_as_plaintext {
        return Ok((Outcome::Pass, unverified));
    }
    Ok(match config.mode {
        Mode::Reject if unverified => (
            Outcome::Refuse("its token looks encrypted but authenticates under no configured key"),
            false,
        ),
        Mode::Reject => (Outcome::Refuse("its token is not encrypted"), false),
        Mode::Encrypt => {
            let sealed = ring.encrypt(token)?;
            note_sealed(ring, &sealed);
            (Outcome::Seal(sealed), unverified)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The trigger.

/// Attribute numbers of the columns the guard reads, and the token column's varchar limit.
struct Columns {
    id: i32,
    token: i32,
    provider: i32,
    status: i32,
    /// varchar(n): n; text or unconstrained varchar: None.
    token_max: Option<usize>,
}

/// Find id, token, provider and status in the table's descriptor: each must be text or
/// varchar (as the engine requires).
///
/// # Safety
/// `rel` must be the trigger's open relation.
unsafe fn columns(rel: pg_sys::Relation, table: &str) -> Result<Columns, GuardError> {
    const NAMES: [&CStr; 4] = [c"id", c"token", c"provider", c"status"];
    let mut found = [0i32; 4];
    let mut token_typmod = -1;
    // SAFETY: the relation is open (the trigger fires on it), so its descriptor is valid and
    // holds natts attributes.
    unsafe {
        let tupdesc = (*rel).rd_att;
        let attrs = (*tupdesc).attrs.as_slice((*tupdesc).natts as usize);
        for (i, att) in attrs.iter().enumerate() {
            if att.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(att.attname.data.as_ptr());
            let Some(slot) = NAMES.iter().position(|n| *n == name) else {
                continue;
            };
            if att.atttypid != pg_sys::TEXTOID && att.atttypid != pg_sys::VARCHAROID {
                let type_name = CStr::from_ptr(pg_sys::format_type_be(att.atttypid))
                    .to_string_lossy()
                    .into_owned();
                return Err(GuardError::ColumnType {
                    table: table.to_owned(),
                    column: column_name(slot),
                    type_name,
                });
            }
            found[slot] = i as i32 + 1;
            if slot == 1 {
                token_typmod = att.atttypmod;
            }
        }
    }
    if let Some(missing) = found.iter().position(|&n| n == 0) {
        return Err(GuardError::MissingColumn {
            table: table.to_owned(),
            column: column_name(missing),
        });
    }
    Ok(Columns {
        id: found[0],
        token: found[1],
        provider: found[2],
        status: found[3],
        // varchar(n) stores n + VARHDRSZ
        token_max: usize::try_from(token_typmod - pg_sys::VARHDRSZ as i32).ok(),
    })
}

fn column_name(slot: usize) -> &'static str {
    ["id", "token", "provider", "status"][slot]
}

/// The bytes of a text/varchar column of `tuple`, detoasted; None when NULL.
///
/// # Safety
/// `tuple` must be a valid tuple of `tupdesc`, and `attnum` one of its text/varchar columns.
/// The slice lives in the current memory context (the trigger's per-tuple context) or in the
/// tuple itself.
unsafe fn text_of<'t>(
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
    attnum: i32,
) -> Option<&'t [u8]> {
    let mut isnull = false;
    // SAFETY: guaranteed by the caller; a text datum detoasts to a varlena.
    unsafe {
        let datum = pg_sys::heap_getattr(tuple, attnum, tupdesc, &mut isnull);
        if isnull {
            return None;
        }
        let value = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        Some(pgrx::varlena::varlena_to_byte_slice(value))
    }
}

/// A column's value for a message: lossy UTF-8, at most 200 bytes, `NULL` for NULL.
fn for_message(value: Option<&[u8]>) -> String {
    match value {
        None => "NULL".into(),
        Some(bytes) => clip(&String::from_utf8_lossy(bytes), 200).to_owned(),
    }
}

/// The trigger arguments as byte strings.
fn trigger_args<'t>(trigger: &'t pg_sys::Trigger) -> impl Iterator<Item = &'t [u8]> + 't {
    let n = usize::try_from(trigger.tgnargs).unwrap_or(0);
    (0..n).map(move |i| {
        // SAFETY: tgargs holds tgnargs NUL-terminated strings that live as long as the
        // trigger's descriptor (the relcache entry, for this call).
        unsafe { CStr::from_ptr(*trigger.tgargs.add(i)).to_bytes() }
    })
}

#[pg_trigger(sql = r#"
CREATE FUNCTION provider_keys_encrypt_guard() RETURNS trigger
    LANGUAGE c
    AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION provider_keys_encrypt_guard() IS
'The guard: BEFORE INSERT OR UPDATE OF token, status ... FOR EACH ROW. Encrypts a plaintext token on write (mode=reject: refuses it); tokens and deleted rows pass.';
"#)]
pub fn provider_keys_encrypt_guard<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    Ok(Some(guard_row(trigger).or_raise()))
}

fn guard_row<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<PgHeapTuple<'a, AllocatedByPostgres>, Error> {
    let data = trigger.trigger_data();
    let fired_before_row = matches!(trigger.when(), Ok(PgTriggerWhen::Before))
        && matches!(trigger.level(), PgTriggerLevel::Row);
    let tuple = match trigger.op() {
        Ok(PgTriggerOperation::Insert) if fired_before_row => data.tg_trigtuple,
        Ok(PgTriggerOperation::Update) if fired_before_row => data.tg_newtuple,
        _ => return Err(GuardError::Protocol.into()),
    };
    let config = Config::parse(trigger_args(trigger.trigger()))?;

    // SAFETY: PostgreSQL fires this trigger on an open relation with a valid new tuple of
    // that relation's descriptor (checked above: BEFORE ROW INSERT/UPDATE).
    unsafe {
        let rel = data.tg_relation;
        let tupdesc = (*rel).rd_att;
        let table = CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy();
        let columns = columns(rel, &table)?;
        let given = || PgHeapTuple::from_heap_tuple(PgTupleDesc::from_pg_unchecked(tupdesc), tuple);

        if text_of(tuple, tupdesc, columns.status) == Some(b"deleted".as_slice()) {
            return Ok(given());
        }
        let Some(token) = text_of(tuple, tupdesc, columns.token) else {
            return Ok(given());
        };
        let (outcome, unverified) = with_keyring(|ring| decide(&config, ring, token))??;
        let id = || for_message(text_of(tuple, tupdesc, columns.id));
        if unverified {
            let provider = for_message(text_of(tuple, tupdesc, columns.provider));
            warn_unverified(&id(), &provider, matches!(outcome, Outcome::Seal(_)));
        }
        match outcome {
            Outcome::Pass => Ok(given()),
            Outcome::Refuse(why) => Err(GuardError::Refused {
                table: table.into_owned(),
                id: id(),
                why,
            }
            .into()),
            Outcome::Seal(sealed) => {
                if let Some(max) = columns.token_max {
                    if sealed.len() > max {
                        return Err(GuardError::TooLong { max, id: id() }.into());
                    }
                }
                let writes = config.format.columns_to_write(&columns, sealed);
                let mut attnums: Vec<i32> = writes.iter().map(|(n, _)| *n).collect();
                let mut values: Vec<pg_sys::Datum> = writes
                    .iter()
                    .map(|(_, v)| {
                        pg_sys::Datum::from(pgrx::varlena::rust_str_to_text_p(v).into_pg())
                    })
                    .collect();
                let mut nulls = vec![false; writes.len()];
                let new_tuple = pg_sys::heap_modify_tuple_by_cols(
                    tuple,
                    tupdesc,
                    writes.len() as i32,
                    attnums.as_mut_ptr(),
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                );
                Ok(PgHeapTuple::from_heap_tuple(
                    PgTupleDesc::from_pg_unchecked(tupdesc),
                    new_tuple,
                ))
            }
        }
    }
}

/// The engine's WARNING for a token-shaped value no key opens, worded as the engine's.
fn warn_unverified(id: &str, provider: &str, sealed: bool) {
    let what = if sealed {
        "the guard encrypted it as plaintext"
    } else {
        "the guard stored it as written"
    };
    let mut report = ErrorReport::new(
        PgSqlErrorCode::ERRCODE_WARNING,
        format!(
            "Provider key {id} for provider {provider} looks like a token but authenticates under no configured key: {what}"
        ),
        "provider_keys_encrypt_guard",
    );
    if sealed {
        report = report.set_hint(
            "If it is a token written under another key, check ENCRYPTION_KEY and the previous keys; decrypt_provider_keys() gives the stored value back unchanged.",
        );
    }
    report.report(PgLogLevel::WARNING);
}

/// `pke_internal.guard_settings(tgnargs, tgargs)`: a guard trigger's settings as the trigger
/// reads them (the same parser), or why its arguments are wrong. For the status function.
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.guard_settings(nargs smallint, args bytea)
RETURNS TABLE (mode text, format text, unverified text, problem text)
    LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'pke_guard_settings_wrapper';
COMMENT ON FUNCTION pke_internal.guard_settings(smallint, bytea) IS
    'Engine internal: a guard trigger''s settings from pg_trigger.tgnargs and tgargs.';
",
    requires = ["engine_types"]
)]
#[allow(clippy::type_complexity)]
pub fn pke_guard_settings(
    nargs: i16,
    args: &[u8],
) -> TableIterator<
    'static,
    (
        name!(mode, Option<String>),
        name!(format, Option<String>),
        name!(unverified, Option<String>),
        name!(problem, Option<String>),
    ),
> {
    // pg_trigger.tgargs: each argument followed by a NUL byte
    let n = usize::try_from(nargs).unwrap_or(0);
    let row = match Config::parse(args.split(|b| *b == 0).take(n)) {
        Ok(config) => {
            let (mode, format, unverified) = config.labels();
            (
                Some(mode.into()),
                Some(format.into()),
                Some(unverified.into()),
                None,
            )
        }
        Err(e) => (None, None, None, Some(e.to_string())),
    };
    TableIterator::once(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, GuardError> {
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
            &["format=llmgw"],
            &["unverified=encrypt"],
            &["mode="],
            &[""],
        ] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, GuardError::Argument(_)), "{bad:?}");
        }
        let long = "x".repeat(1000);
        let msg = parse(&[&long]).unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
        assert!(matches!(
            Config::parse([b"mode=\xff".as_slice()]),
            Err(GuardError::Argument(_))
        ));
    }

    #[test]
    fn clip_cuts_at_char_boundaries() {
        assert_eq!(clip("ключ", 3), "к");
        assert_eq!(clip("abc", 10), "abc");
    }
}
