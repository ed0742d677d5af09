//! The guard: `provider_keys_encrypt_guard()`, a trigger that keeps plaintext out of a
//! provider_key table while something still writes it (gateway instances on old code during a
//! rolling deploy, an admin script, a restored row).
//!
//! ```sql
//! CREATE TRIGGER provider_keys_encrypt_guard
//!     BEFORE INSERT OR UPDATE OF id, token, status ON provider_key
//!     FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard();   -- or ('mode=reject')
//! -- the gateway's llmgw layout (token -> token_ciphertext, token_hash, token_masked):
//! CREATE TRIGGER provider_keys_encrypt_guard
//!     BEFORE INSERT OR UPDATE OF id, token ON provider_key
//!     FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard('format=llmgw');
//! ```
//!
//! `format=base64` (the default). For each row written (the new version of the row):
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
//! `format=llmgw` (the gateway's rollout layout: `token` NULL or plaintext, `token_ciphertext`,
//! `token_hash`, `token_masked`, `organization_id`; status does not matter: every row moves, as
//! in the engine's backfill). For each row written:
//! * `token` NULL: written as given, without touching the keyring. The gateway's new code and
//!   the engine's own backfill (`SET token = NULL, token_ciphertext = …`) write this, so a run
//!   pays nothing for the guard.
//! * a plaintext `token`: `mode=encrypt` seals it for the row's own id and organization (NULL:
//!   the managed scope) with [`crate::llmgw::seal_row`], exactly what the backfill writes, into
//!   `token_ciphertext`, `token_hash` and `token_masked`, and sets `token` NULL (so the
//!   gateway's `CHECK ((token IS NULL) <> (token_ciphertext IS NULL))` holds); the last
//!   plaintext written wins over an older ciphertext. `mode=reject` raises 23000. A NULL id
//!   raises 22004, as the llmgw functions do.
//! * an llmgw token in `token` (`llmgw:` prefix): the engine's `unverified` for llmgw (it never
//!   seals a token twice): a WARNING naming the row, then written as given
//!   (`unverified=keep`, the default for llmgw, the engine's treatment) or sealed as a
//!   plaintext (`unverified=plaintext`). `encrypt_unverified` does not apply to llmgw in the
//!   engine, so a run installs `('format=llmgw')` whatever it is given.
//!
//! The UPDATE columns the guard must fire on are [`Format::watches`]: id, token and status for
//! base64 (un-deleting a row brings its plaintext back), id and token for llmgw (a new id
//! moves a plaintext row behind a run's position in its walk by id);
//! `pke_internal.guard_settings` reports them and `provider_keys_guard_status().covers_writes`
//! checks them.
//!
//! The guard runs no SQL: it reads the row's columns straight from the tuple, so nothing on
//! anyone's search_path (a planted operator or overload) can run through it.
//!
//! Arguments are `key=value`, each key at most once; anything else is an error (22023) the
//! first time the trigger fires. What a format reads and writes: [`Format::required`] and
//! [`SealedRow::columns_to_write`]; the decision (pass / seal / refuse): `decide` (base64) and
//! `decide_llmgw`, both plain Rust.
//!
//! The engine's own writes (base64): `UPDATE ... SET token = encrypt_token(t.token)` fires the
//! guard on the token this backend has just sealed. [`note_sealed`] keeps the last token sealed
//! in this backend and the fingerprint of the key it was sealed under; a token equal to it byte
//! for byte, while that key is still the current key, is known to authenticate under the
//! current key and is passed without opening it again.

use std::cell::{Cell, RefCell};
use std::ffi::CStr;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode, PgTupleDesc};

use crate::errors::{Error, GuardError, OrRaise};
use crate::gucs::{with_gateway_keyring, with_keyring};
use crate::keys::{KeyRing, TokenState};
use crate::llmgw::seal_row;
use provider_keys_encrypt_core::format_llmgw::LlmgwError;
use provider_keys_encrypt_core::RowContext;

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
    /// The gateway's rollout layout: the plaintext in `token` moves to `token_ciphertext`
    /// (`llmgw:v2:…`, bound to the row's id and organization), `token_hash` and
    /// `token_masked`, keyring GATEWAY_API_KEY_HASH_SECRET; `token` is set NULL.
    Llmgw,
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

    /// Parse trigger arguments: `mode=encrypt|reject`, `format=base64|llmgw`,
    /// `unverified=plaintext|keep`, each at most once, in any order. Without `unverified`, the
    /// format's default: `plaintext` for base64, `keep` for llmgw (see the module doc).
    pub fn parse<'a>(args: impl IntoIterator<Item = &'a [u8]>) -> Result<Config, GuardError> {
        let mut config = Config::DEFAULT;
        let mut unverified = None;
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
                ("format", "llmgw") => config.format = Format::Llmgw,
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
            match self.format {
                Format::Base64 => "base64",
                Format::Llmgw => "llmgw",
            },
            match self.unverified {
                Unverified::Plaintext => "plaintext",
                Unverified::Keep => "keep",
            },
        )
    }
}

impl Format {
    /// The columns whose UPDATE can bring a plaintext back: the guard must fire on an UPDATE
    /// of each (`BEFORE INSERT OR UPDATE OF <these>`). A run walks the table in id order, so a
    /// plaintext row given a smaller id would end behind it: id matters for both. base64
    /// passes soft-deleted rows, so an UPDATE of status (un-deleting a row) matters too; llmgw
    /// moves every row whatever its status.
    pub fn watches(self) -> &'static [&'static str] {
        match self {
            Format::Base64 => &["id", "token", "status"],
            Format::Llmgw => &["id", "token"],
        }
    }

    /// The columns the guard reads or writes: each must exist and be text or varchar.
    fn required(self) -> &'static [Col] {
        match self {
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
}

/// What the guard sealed from one plaintext.
enum SealedRow {
    /// base64: the token for column `token`.
    Token(String),
    /// llmgw: (token_ciphertext, token_hash, token_masked), from `crate::llmgw::seal_row`.
    Llmgw {
        ciphertext: String,
        hash: String,
        masked: String,
    },
}

impl SealedRow {
    /// The columns a sealed row writes (None: set NULL). llmgw moves the plaintext out of
    /// `token`.
    fn columns_to_write(self) -> Vec<(Col, Option<String>)> {
        match self {
            SealedRow::Token(token) => vec![(Col::Token, Some(token))],
            SealedRow::Llmgw {
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
// llmgw: the decision for one row, pure Rust over the row's `token` bytes.

/// What the llmgw guard does with a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LlmgwDecision {
    /// Write the row as given (`token` NULL: the gateway's new code and the engine's own
    /// backfill; or an llmgw token kept as given).
    Pass,
    /// Seal `token` as a plaintext into token_ciphertext, token_hash and token_masked, and set
    /// `token` NULL.
    Seal,
    /// mode=reject: refuse the write; why (never the value).
    Refuse(&'static str),
}

/// The prefix of every llmgw token (`llmgw:v1:`, `llmgw:v2:`, …): never a plaintext key.
const LLMGW_PREFIX: &[u8] = b"llmgw:";

/// What to do with a new row's `token` (None: NULL), and whether it is `unverified` (an llmgw
/// token in `token`, or a token `base64_token` recognises as one of this extension's base64
/// tokens, as the engine's llmgw_state does: the caller warns). No keyring is needed to decide
/// a NULL `token`: it costs nothing.
fn decide_llmgw(
    config: &Config,
    token: Option<&[u8]>,
    base64_token: impl FnOnce(&[u8]) -> bool,
) -> (LlmgwDecision, bool) {
    let Some(token) = token else {
        return (LlmgwDecision::Pass, false);
    };
    let unverified = token.starts_with(LLMGW_PREFIX) || base64_token(token);
    if unverified && config.unverified == Unverified::Keep {
        return (LlmgwDecision::Pass, true);
    }
    match config.mode {
        Mode::Reject if unverified => (
            LlmgwDecision::Refuse(
                "its column token holds a token (llmgw, or base64 of this extension), not a key",
            ),
            false,
        ),
        Mode::Reject => (
            LlmgwDecision::Refuse("its column token holds a plaintext key"),
            false,
        ),
        Mode::Encrypt => (LlmgwDecision::Seal, unverified),
    }
}

// ---------------------------------------------------------------------------------------------
// The trigger.

/// The columns the guard may read or write; which ones a format needs: [`Format::required`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Id,
    Token,
    Provider,
    Status,
    TokenCiphertext,
    TokenHash,
    TokenMasked,
    OrganizationId,
}

const COLUMN_NAMES: [&CStr; 8] = [
    c"id",
    c"token",
    c"provider",
    c"status",
    c"token_ciphertext",
    c"token_hash",
    c"token_masked",
    c"organization_id",
];

impl Col {
    const ALL: [Col; 8] = [
        Col::Id,
        Col::Token,
        Col::Provider,
        Col::Status,
        Col::TokenCiphertext,
        Col::TokenHash,
        Col::TokenMasked,
        Col::OrganizationId,
    ];

    fn name(self) -> &'static str {
        [
            "id",
            "token",
            "provider",
            "status",
            "token_ciphertext",
            "token_hash",
            "token_masked",
            "organization_id",
        ][self as usize]
    }
}

/// Attribute numbers of the columns the format needs (0: not there), and each one's varchar
/// limit.
struct Columns {
    attnum: [i32; 8],
    /// varchar(n): n; text or unconstrained varchar: None.
    max: [Option<usize>; 8],
}

impl Columns {
    fn at(&self, col: Col) -> i32 {
        self.attnum[col as usize]
    }
}

/// Find the columns `format` needs in the table's descriptor: each must be there and be text
/// or varchar (as the engine requires).
///
/// # Safety
/// `rel` must be the trigger's open relation.
unsafe fn columns(
    rel: pg_sys::Relation,
    table: &str,
    format: Format,
) -> Result<Columns, GuardError> {
    let required = format.required();
    let mut found = Columns {
        attnum: [0; 8],
        max: [None; 8],
    };
    // SAFETY: the relation is open (the trigger fires on it), so its descriptor is valid and
    // holds natts attributes.
    unsafe {
        // PgTupleDesc reads the attributes where each major keeps them (18 moved them behind
        // compact_attrs); it borrows the relcache's descriptor and never frees it.
        let tupdesc = PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        for (i, att) in tupdesc.iter().enumerate() {
            if att.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(att.attname.data.as_ptr());
            let Some(slot) = COLUMN_NAMES.iter().position(|n| *n == name) else {
                continue;
            };
            let col = Col::ALL[slot];
            if !required.contains(&col) {
                continue;
            }
            if att.atttypid != pg_sys::TEXTOID && att.atttypid != pg_sys::VARCHAROID {
                let type_name = CStr::from_ptr(pg_sys::format_type_be(att.atttypid))
                    .to_string_lossy()
                    .into_owned();
                return Err(GuardError::ColumnType {
                    table: table.to_owned(),
                    column: col.name(),
                    type_name,
                });
            }
            found.attnum[slot] = i as i32 + 1;
            // varchar(n) stores n + VARHDRSZ
            found.max[slot] = usize::try_from(att.atttypmod - pg_sys::VARHDRSZ as i32).ok();
        }
    }
    if let Some(missing) = required.iter().find(|c| found.at(**c) == 0) {
        return Err(GuardError::MissingColumn {
            table: table.to_owned(),
            column: missing.name(),
        });
    }
    Ok(found)
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
'The guard: BEFORE INSERT OR UPDATE OF id, token, status ... FOR EACH ROW (format=llmgw: UPDATE OF id, token). Encrypts a plaintext token on write (format=llmgw: moves it into token_ciphertext, token_hash and token_masked; mode=reject: refuses it); tokens and deleted rows pass (llmgw: rows with token NULL pass).';
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
        let columns = columns(rel, &table, config.format)?;
        let given = || PgHeapTuple::from_heap_tuple(PgTupleDesc::from_pg_unchecked(tupdesc), tuple);
        let id = || for_message(text_of(tuple, tupdesc, columns.at(Col::Id)));
        let provider = || for_message(text_of(tuple, tupdesc, columns.at(Col::Provider)));
        let refused = |why| {
            Error::from(GuardError::Refused {
                table: table.clone().into_owned(),
                id: id(),
                why,
                format: config.format,
            })
        };

        let sealed = match config.format {
            Format::Base64 => {
                if text_of(tuple, tupdesc, columns.at(Col::Status)) == Some(b"deleted".as_slice()) {
                    return Ok(given());
                }
                let Some(token) = text_of(tuple, tupdesc, columns.at(Col::Token)) else {
                    return Ok(given());
                };
                let (outcome, unverified) = with_keyring(|ring| decide(&config, ring, token))??;
                if unverified {
                    warn_unverified(
                        config.format,
                        &id(),
                        &provider(),
                        matches!(outcome, Outcome::Seal(_)),
                    );
                }
                match outcome {
                    Outcome::Pass => return Ok(given()),
                    Outcome::Refuse(why) => return Err(refused(why)),
                    Outcome::Seal(sealed) => SealedRow::Token(sealed),
                }
            }
            Format::Llmgw => {
                let token = text_of(tuple, tupdesc, columns.at(Col::Token));
                let (decision, unverified) = decide_llmgw(&config, token, |t| {
                    std::str::from_utf8(t).is_ok_and(crate::llmgw::is_base64_token)
                });
                if unverified {
                    warn_unverified(
                        config.format,
                        &id(),
                        &provider(),
                        decision == LlmgwDecision::Seal,
                    );
                }
                match decision {
                    LlmgwDecision::Pass => return Ok(given()),
                    LlmgwDecision::Refuse(why) => return Err(refused(why)),
                    LlmgwDecision::Seal => {}
                }
                // the database is UTF8 (the extension refuses any other), so these are text
                let utf8 = |col: Col| {
                    text_of(tuple, tupdesc, columns.at(col))
                        .map(|b| std::str::from_utf8(b).map_err(|_| LlmgwError::NotText))
                        .transpose()
                };
                let plaintext = utf8(Col::Token)?.unwrap_or_default();
                let ctx = RowContext {
                    // a NULL id: the llmgw functions' own error (22004), never XX000
                    id: utf8(Col::Id)?.ok_or(Error::NullRowId)?,
                    organization_id: utf8(Col::OrganizationId)?,
                };
                let (ciphertext, hash, masked) =
                    with_gateway_keyring(|ring| seal_row(ring, plaintext, &ctx))??;
                SealedRow::Llmgw {
                    ciphertext,
                    hash,
                    masked,
                }
            }
        };

        let writes = sealed.columns_to_write();
        for (col, value) in &writes {
            if let (Some(max), Some(value)) = (columns.max[*col as usize], value) {
                if value.chars().count() > max {
                    return Err(GuardError::TooLong {
                        max,
                        id: id(),
                        column: col.name(),
                    }
                    .into());
                }
            }
        }
        let mut attnums: Vec<i32> = writes.iter().map(|(c, _)| columns.at(*c)).collect();
        let mut values: Vec<pg_sys::Datum> = writes
            .iter()
            .map(|(_, v)| match v {
                Some(v) => pg_sys::Datum::from(pgrx::varlena::rust_str_to_text_p(v).into_pg()),
                None => pg_sys::Datum::from(0usize),
            })
            .collect();
        let mut nulls: Vec<bool> = writes.iter().map(|(_, v)| v.is_none()).collect();
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

/// The engine's WARNING for an unverified value (base64: token-shaped but no key opens it;
/// llmgw: an llmgw token in column token), worded as the engine's. Names the row, never the
/// value.
fn warn_unverified(format: Format, id: &str, provider: &str, sealed: bool) {
    let (what, done, hint) = match (format, sealed) {
        (Format::Base64, _) => (
            "looks like a token but authenticates under no configured key",
            if sealed {
                "the guard encrypted it as plaintext"
            } else {
                "the guard stored it as written"
            },
            "If it is a token written under another key, check ENCRYPTION_KEY and the previous keys; decrypting it (the extension's decrypt_provider_keys procedure, called by its schema-qualified name) gives the stored value back unchanged.",
        ),
        (Format::Llmgw, _) => (
            "has an llmgw token in column token (the gateway reads token_ciphertext)",
            if sealed {
                "the guard sealed it as a plaintext key into token_ciphertext"
            } else {
                "the guard stored it as written"
            },
            "An llmgw token belongs in token_ciphertext, with token NULL; the guard's unverified=keep (the default for format=llmgw) leaves such a write as given.",
        ),
    };
    // the statement that wrote the row holds the value (log_min_error_statement = warning)
    crate::gucs::hide_statement_of_next(PgSqlErrorCode::ERRCODE_WARNING);
    let mut report = ErrorReport::new(
        PgSqlErrorCode::ERRCODE_WARNING,
        format!("Provider key {id} for provider {provider} {what}: {done}"),
        "provider_keys_encrypt_guard",
    );
    if sealed {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::WARNING);
}

/// `pke_internal.guard_settings(tgnargs, tgargs)`: a guard trigger's settings as the trigger
/// reads them (the same parser), or why its arguments are wrong. For the status function.
#[pg_extern(
    sql = "
CREATE FUNCTION pke_internal.guard_settings(nargs smallint, args bytea)
RETURNS TABLE (mode text, format text, unverified text, watches text[], problem text)
    LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'pke_guard_settings_wrapper';
COMMENT ON FUNCTION pke_internal.guard_settings(smallint, bytea) IS
    'Engine internal: a guard trigger''s settings from pg_trigger.tgnargs and tgargs, and the columns whose UPDATE it must fire on.';
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
        name!(watches, Option<Vec<String>>),
        name!(problem, Option<String>),
    ),
> {
    // pg_trigger.tgargs: each argument followed by a NUL byte
    let n = usize::try_from(nargs).unwrap_or(0);
    let row = match Config::parse(args.split(|b| *b == 0).take(n)) {
        Ok(config) => {
            let (mode, format, unverified) = config.labels();
            let watches = config.format.watches().iter().map(|c| c.to_string());
            (
                Some(mode.into()),
                Some(format.into()),
                Some(unverified.into()),
                Some(watches.collect()),
                None,
            )
        }
        Err(e) => (None, None, None, None, Some(e.to_string())),
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
            &["format=llmgw", "format=base64"],
            &["format=LLMGW"],
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
        assert_eq!(Format::Base64.watches(), &["id", "token", "status"]);
        assert_eq!(Format::Llmgw.watches(), &["id", "token"]);
        assert!(!Format::Llmgw.required().contains(&Col::Status));
        assert!(Format::Llmgw.required().contains(&Col::OrganizationId));
        for col in Col::ALL {
            assert_eq!(
                COLUMN_NAMES[col as usize].to_str().unwrap(),
                col.name(),
                "{col:?}"
            );
        }
    }

    #[test]
    fn llmgw_decisions() {
        use LlmgwDecision::*;
        let config = |args: &[&str]| parse(args).unwrap();
        let encrypt = config(&["format=llmgw"]);
        let encrypt_all = config(&["format=llmgw", "unverified=plaintext"]);
        let reject = config(&["format=llmgw", "mode=reject"]);
        let reject_all = config(&["format=llmgw", "mode=reject", "unverified=plaintext"]);
        let token = Some(b"llmgw:v2:0123abcd:aa:bb:cc".as_slice());
        let plain = Some(b"sk-live-1234567890".as_slice());
        for (config, input, expected) in [
            // token NULL: the new code's and the backfill's writes, whatever the mode
            (&encrypt, None, (Pass, false)),
            (&reject, None, (Pass, false)),
            (&reject_all, None, (Pass, false)),
            // a plaintext: sealed, or refused
            (&encrypt, plain, (Seal, false)),
            (&encrypt_all, plain, (Seal, false)),
            (
                &reject,
                plain,
                (Refuse("its column token holds a plaintext key"), false),
            ),
            (&encrypt, Some(b"".as_slice()), (Seal, false)),
            (&encrypt, Some(b"\xff\xfe".as_slice()), (Seal, false)),
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
            (&encrypt, Some(b"LLMGW:v2:x".as_slice()), (Seal, false)),
            (&encrypt, Some(b"llmgw".as_slice()), (Seal, false)),
        ] {
            assert_eq!(
                decide_llmgw(config, input, |_| false),
                expected,
                "{config:?} {input:?}"
            );
        }
        // a base64 token of this extension in `token` is treated as an llmgw token is
        let b64 = Some(b"c2VhbGVkIGJ5IHRoaXMgZXh0ZW5zaW9u".as_slice());
        assert_eq!(decide_llmgw(&encrypt, b64, |_| true), (Pass, true));
        assert_eq!(decide_llmgw(&encrypt_all, b64, |_| true), (Seal, true));
        assert_eq!(decide_llmgw(&encrypt, b64, |_| false), (Seal, false));
        // and the check is not even asked for a NULL token
        assert_eq!(
            decide_llmgw(&encrypt, None, |_| unreachable!()),
            (Pass, false)
        );
    }

    #[test]
    fn sealed_llmgw_moves_the_plaintext_out_of_token() {
        let writes = SealedRow::Llmgw {
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
            SealedRow::Token("t".into()).columns_to_write(),
            vec![(Col::Token, Some("t".into()))]
        );
    }

    #[test]
    fn clip_cuts_at_char_boundaries() {
        assert_eq!(clip("ключ", 3), "к");
        assert_eq!(clip("abc", 10), "abc");
    }
}
