//! What this library keeps out of the server log: the `STATEMENT:` and `CONTEXT:` lines of a
//! report whose statement may hold a key, a plaintext or a token. An `emit_log_hook`, chained
//! after whatever hook was installed before it.
//!
//! Two kinds of report are marked, each right before it is raised:
//! * a refused value of one of the key settings ([`mark_refused`]: the settings' check hook);
//! * one of this library's own errors or warnings about a value the statement carries (a
//!   plaintext key a guard refuses, an input a function refuses): [`hide_statement_of_next`].
//!
//! Both only affect the server log; the client still gets the whole report. Out of reach: a
//! statement logged before it runs (`log_statement = all`, `log_min_duration_statement`, an
//! extension's own logging): docs/security.md.

use std::cell::Cell;
use std::ffi::CStr;
use std::sync::OnceLock;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// The `emit_log_hook` that was installed before ours (called after ours, always).
static PREVIOUS_EMIT_LOG_HOOK: OnceLock<pg_sys::emit_log_hook_type> = OnceLock::new();
/// Recognises the check hook's refusal by its message (given by [`install`]).
static IS_REFUSAL: OnceLock<fn(&[u8]) -> bool> = OnceLock::new();

thread_local! {
    /// Set by the check hook when it refuses a value; the log hook hides the statement of the
    /// refusal that follows.
    static REFUSED: Cell<bool> = const { Cell::new(false) };
    /// The SQLSTATE of a report this library is about to raise whose statement may hold a
    /// plaintext or a token: the log hook hides that report's statement and context.
    static HIDE_NEXT: Cell<i32> = const { Cell::new(0) };
}

/// Install the hook (once per process, from `_PG_init`). `is_refusal` tells the settings'
/// refusal message (SQLSTATE 55P02) from any other.
pub fn install(is_refusal: fn(&[u8]) -> bool) {
    let _ = IS_REFUSAL.set(is_refusal);
    // SAFETY: _PG_init runs once per process, single-threaded, before any report can use the
    // hook; chained, so whatever hook was installed before ours still sees every report.
    unsafe {
        if PREVIOUS_EMIT_LOG_HOOK.set(pg_sys::emit_log_hook).is_ok() {
            pg_sys::emit_log_hook = Some(hide_statements);
        }
    }
}

/// The settings' check hook refused a value: hide the statement of the refusal guc.c raises
/// next. With `log_min_error_statement = error` (the default) PostgreSQL writes the failing
/// statement after the error as a `STATEMENT:` line, and the statement holds the value that
/// was refused: a key. The check hook cannot `errhidestmt` (guc.c raises the error itself),
/// so the log hook marks exactly that report: one with the refusal's SQLSTATE and message.
pub fn mark_refused() {
    REFUSED.with(|c| c.set(true));
}

/// The next report with this SQLSTATE is one of this library's own errors or warnings about a
/// value the statement carries: keep that report's `STATEMENT:` and `CONTEXT:` lines out of
/// the server log. Called right before the report is raised. (If the report is caught instead
/// of emitted, the mark stays until a report with the same SQLSTATE: that one's statement is
/// hidden too. It never hides less.)
pub fn hide_statement_of_next(sqlstate: PgSqlErrorCode) {
    let _ = HIDE_NEXT.try_with(|c| c.set(sqlstate as i32));
}

/// Sets `hide_stmt` (the `STATEMENT:` line) and `hide_ctx` (a `CONTEXT:` line quotes the SQL
/// statement of a PL/pgSQL function, e.g. `PERFORM set_config(…, '<key>', …)`) on a marked
/// report.
///
/// # Safety
/// Called by elog.c with the report being emitted.
#[pg_guard]
unsafe extern "C-unwind" fn hide_statements(edata: *mut pg_sys::ErrorData) {
    // SAFETY: elog.c passes a valid ErrorData (or NULL, checked) that it owns while we run.
    if let Some(e) = unsafe { edata.as_mut() } {
        // SAFETY: the message is NULL or a NUL-terminated string of the report.
        // try_with: a report emitted while the thread exits must not panic in here
        if REFUSED.try_with(Cell::get).unwrap_or(false) && unsafe { is_refusal(e) } {
            let _ = REFUSED.try_with(|c| c.set(false));
            e.hide_stmt = true;
            e.hide_ctx = true;
        } else if HIDE_NEXT.try_with(Cell::get).unwrap_or(0) == e.sqlerrcode
            && e.sqlerrcode != 0
            // SAFETY: funcname is NULL or a NUL-terminated string of the report
            && unsafe { raised_here(e) }
        {
            let _ = HIDE_NEXT.try_with(|c| c.set(0));
            e.hide_stmt = true;
            e.hide_ctx = true;
        }
    }
    if let Some(Some(previous)) = PREVIOUS_EMIT_LOG_HOOK.get() {
        // SAFETY: the previous hook gets the report exactly as elog.c gave it to us.
        unsafe { previous(edata) }
    }
}

/// Was this report raised by this library (`Error::raise`, the guard's warnings: their
/// `ErrorReport` function name starts with the extension's name)? A mark left by a report that
/// was caught never hides another code's statement.
///
/// # Safety
/// `e.funcname` must be NULL or a valid NUL-terminated string.
unsafe fn raised_here(e: &pg_sys::ErrorData) -> bool {
    // SAFETY: guaranteed by the caller.
    !e.funcname.is_null()
        && unsafe { CStr::from_ptr(e.funcname) }
            .to_bytes()
            .starts_with(b"provider_keys_encrypt")
}

/// Is this report the check hook's refusal (its SQLSTATE and message)?
///
/// # Safety
/// `e.message` must be NULL or a valid NUL-terminated string.
unsafe fn is_refusal(e: &pg_sys::ErrorData) -> bool {
    if e.sqlerrcode != PgSqlErrorCode::ERRCODE_CANT_CHANGE_RUNTIME_PARAM as i32
        || e.message.is_null()
    {
        return false;
    }
    // SAFETY: guaranteed by the caller.
    let message = unsafe { CStr::from_ptr(e.message) }.to_bytes();
    IS_REFUSAL.get().is_some_and(|f| f(message))
}
