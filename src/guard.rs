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
//!   same test as the engine's: the keyring's `classify`, so `reencrypt_provider_keys` and the guard
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
//!   the managed scope) with [`crate::format::llmgw::seal_row`], exactly what the backfill writes, into
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
//! The UPDATE columns the guard must fire on are core's `guard::watches`: id, token and status for
//! base64 (un-deleting a row brings its plaintext back), id and token for llmgw (a new id
//! moves a plaintext row behind a run's position in its walk by id);
//! `pke_internal.guard_settings` reports them and `provider_keys_guard_status().covers_writes`
//! checks them.
//!
//! The guard runs no SQL: it reads the row's columns straight from the tuple, so nothing on
//! anyone's search_path (a planted operator or overload) can run through it.
//!
//! Arguments are `key=value`, each key at most once; anything else is an error (22023) the
//! first time the trigger fires. Everything the guard decides without PostgreSQL (its
//! arguments, what a format reads and writes, pass / seal / refuse) is core's
//! `provider_keys_encrypt_core::guard`, tested there with plain `#[test]`s; this file reads
//! and rewrites the tuple.
//!
//! The engine's own writes (base64): a token this backend has just sealed is passed without
//! opening it again (`format::base64::sealed_just_now`).

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode, PgTupleDesc};
use provider_keys_encrypt_core::format::llmgw::LlmgwError;
use provider_keys_encrypt_core::format::{base64, llmgw, Format, Keyring as _, State};
use provider_keys_encrypt_core::guard::{
    clip, decide, llmgw_token_state, required, watches, Col, Config, Decision, Sealed,
    UNVERIFIED_BASE64,
};
use provider_keys_encrypt_core::RowContext;

use crate::errors::{Error, GuardError, OrRaise};
use crate::format::base64::{note_sealed, sealed_just_now};
use crate::format::llmgw::{is_base64_token, seal_row};
use crate::keyring::with_keyring;
use crate::log_filter;

thread_local! {
    /// (tokens passed as just sealed, tokens the guard classified in full), for tests.
    static COUNTS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
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

/// base64: the state of a row's token under the keyring; a token this backend has just sealed
/// under what is still the current key is not opened again.
fn base64_state(ring: &base64::Keyring, token: &[u8]) -> Result<State, Error> {
    let just_sealed = sealed_just_now(ring, token);
    count(just_sealed);
    if just_sealed {
        return Ok(State::Current);
    }
    Ok(match std::str::from_utf8(token) {
        Ok(text) => ring.classify(text, ())?,
        Err(_) => State::Plaintext, // not text, so not base64 either
    })
}

// ---------------------------------------------------------------------------------------------
// The trigger.

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
    let required = required(format);
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
            let Some(col) = Col::from_name(name.to_bytes()) else {
                continue;
            };
            let slot = col as usize;
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

        // base64 passes a soft-deleted row as it is; both formats pass a NULL token without a
        // look (llmgw: the gateway's new code and the engine's own backfill write it)
        if config.format == Format::Base64
            && text_of(tuple, tupdesc, columns.at(Col::Status)) == Some(b"deleted".as_slice())
        {
            return Ok(given());
        }
        let Some(token) = text_of(tuple, tupdesc, columns.at(Col::Token)) else {
            return Ok(given());
        };
        let state = match config.format {
            Format::Base64 => with_keyring(|ring| base64_state(ring, token))??,
            Format::Llmgw => {
                llmgw_token_state(token, |t| std::str::from_utf8(t).is_ok_and(is_base64_token))
            }
        };
        let (decision, unverified) = decide(&config, state);
        let warn = |sealed| {
            if unverified {
                warn_unverified(config.format, &id(), &provider(), sealed);
            }
        };
        match decision {
            Decision::Pass => {
                warn(false);
                return Ok(given());
            }
            Decision::Refuse(why) => return Err(refused(why)),
            Decision::Seal => {}
        }

        // An unverified value is warned about once its token is sealed (base64), or before it
        // is sealed (llmgw), as in 0.2.1: a base64 value too long to seal raises 54000 alone.
        let sealed = match config.format {
            Format::Base64 => {
                let token = with_keyring(|ring: &base64::Keyring| {
                    let sealed = ring.seal_bytes(token)?;
                    note_sealed(ring, &sealed);
                    Ok::<_, Error>(sealed)
                })??;
                warn(true);
                Sealed::Token(token)
            }
            Format::Llmgw => {
                warn(true);
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
                    with_keyring(|ring: &llmgw::Keyring| seal_row(ring, plaintext, &ctx))??;
                Sealed::Llmgw {
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
            UNVERIFIED_BASE64,
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
    log_filter::hide_statement_of_next(PgSqlErrorCode::ERRCODE_WARNING);
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
            let watches = watches(config.format).iter().map(|c| c.to_string());
            (
                Some(mode.into()),
                Some(format.into()),
                Some(unverified.into()),
                Some(watches.collect()),
                None,
            )
        }
        Err(e) => (
            None,
            None,
            None,
            None,
            Some(GuardError::from(e).to_string()),
        ),
    };
    TableIterator::once(row)
}
