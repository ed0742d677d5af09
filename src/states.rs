//! The token states in SQL: the enum `pke_internal.token_state` (src/engine/types.sql), whose
//! labels are core's [`State::label`] in the order of [`State::ALL`]. One vocabulary: the
//! engine, the report, the guard and the messages use exactly these names, for both formats.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{function_name, PgLogLevel, PgSqlErrorCode};
use provider_keys_encrypt_core::format::State;

/// The OID of `state`'s label in the calling function's return type
/// (`pke_internal.token_state`), for a C function that returns the enum.
///
/// # Safety
/// `fcinfo` must be the call's own, valid `FunctionCallInfo`, of a function declared to
/// return `pke_internal.token_state`.
pub unsafe fn state_oid(fcinfo: pg_sys::FunctionCallInfo, state: State) -> pg_sys::Oid {
    let index = State::ALL
        .iter()
        .position(|s| *s == state)
        .expect("State::ALL holds every state");
    // SAFETY: guaranteed by the caller.
    unsafe { state_oids(fcinfo)[index] }
}

/// The OIDs of the enum's labels, cached in the calling expression's `fn_extra` (so a
/// re-created extension, with new OIDs, is never served stale ones).
///
/// # Safety
/// `fcinfo` must be the call's own, valid `FunctionCallInfo`.
unsafe fn state_oids(fcinfo: pg_sys::FunctionCallInfo) -> &'static [pg_sys::Oid; 4] {
    // SAFETY: the caller passes its own fcinfo; flinfo and fn_mcxt live as long as the
    // expression that calls this function, and so does what we allocate in fn_mcxt.
    unsafe {
        let flinfo = (*fcinfo).flinfo;
        if (*flinfo).fn_extra.is_null() {
            let typoid = pg_sys::get_func_rettype((*flinfo).fn_oid);
            let mut oids = [pg_sys::InvalidOid; 4];
            for (slot, state) in oids.iter_mut().zip(State::ALL) {
                *slot = pg_sys::GetSysCacheOid(
                    pg_sys::SysCacheIdentifier::ENUMTYPOIDNAME as _,
                    pg_sys::Anum_pg_enum_oid as _,
                    pg_sys::Datum::from(typoid),
                    pg_sys::Datum::from(state.label().as_ptr()),
                    pg_sys::Datum::from(0),
                    pg_sys::Datum::from(0),
                );
                if *slot == pg_sys::InvalidOid {
                    ErrorReport::new(
                        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                        "pke_internal.token_state lacks a label this library needs",
                        function_name!(),
                    )
                    .set_hint("Run ALTER EXTENSION provider_keys_encrypt UPDATE.")
                    .report(PgLogLevel::ERROR);
                }
            }
            let mem = pg_sys::MemoryContextAlloc((*flinfo).fn_mcxt, size_of::<[pg_sys::Oid; 4]>())
                as *mut [pg_sys::Oid; 4];
            mem.write(oids);
            (*flinfo).fn_extra = mem.cast();
        }
        &*((*flinfo).fn_extra as *const [pg_sys::Oid; 4])
    }
}
