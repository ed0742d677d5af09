//! `provider_keys_encrypt.key_command`: keys from the operator's command (a secret manager's
//! CLI, a root-only file), one answer per configuration reload for the whole server, kept in
//! shared memory. Running the command: [`run`]; its output's format: core's `key_command`.
//!
//! How the processes share it (issue 20):
//!
//! * **The postmaster** runs the command once at start, in its shared-memory startup hook, and
//!   puts the output straight into shared memory: no process memory keeps it, so nothing
//!   forked later inherits a stale copy. At each reload it counts the reload (`RELOADS`): the
//!   setting's assign hook runs in the postmaster while it re-reads the configuration, before
//!   it signals the other processes.
//! * **A backend** notes that count when it reloads (the same hook; PostgreSQL reloads a
//!   backend only between statements). At its next need of a key, if no run has answered that
//!   reload yet, it runs the command itself, one process at a time for the whole server
//!   (`RUNNER`), while the others wait for the answer: one run per reload, whichever backend
//!   needs a key first. Otherwise a need of a key costs one comparison.
//! * **The answer** is the last good output. A run that fails, or prints keys that do not
//!   parse, keeps the output before it for every process and is logged once, with its
//!   SQLSTATE, never a byte of the output. The last four good outputs stay (each wiped when
//!   overwritten), so that a parallel worker finds the one its leader uses.
//! * **A statement runs under one set of keys.** A backend takes new keys only after it
//!   processed a reload, between statements (a CALL is one statement), and never while it leads
//!   parallel workers (parallel mode). A parallel worker never runs the command: it uses the
//!   output its leader uses, which the leader publishes in its slot (below); if that output is no
//!   longer kept, the worker refuses (40001).
//! * **Each backend has a slot** in shared memory (by proc number): the generation it uses, and
//!   the oldest generation its current transaction used, its parallel workers included (or,
//!   inside a CALL that commits, the one the CALL goes on with). A session publishes a new
//!   generation in its slot before it releases the lock it read it under, and empties its slot
//!   when it exits. `reencrypt_provider_keys` first waits for every session whose transaction
//!   used keys older than its own, or that runs a transaction while it holds older keys
//!   ([`wait_for_older_keys`]), so its closing "can be removed" is true: after a reload, no
//!   session goes on sealing under a key the operator is about to drop.
//! * **SHOW** and pg_settings read shared memory only: they never run the command.
//! * **A run is not interrupted**: a cancel or terminate request of the session running it
//!   takes effect when it ends, within `key_command_timeout` (sessions waiting for it stay
//!   cancellable). Cancelling one's own statements cannot make the server start the command
//!   again and again. (A backend that dies during a run takes the server through crash recovery,
//!   which makes shared memory anew; a runner found gone or past its time is taken over.)
//! * **A transaction that used the command's keys cannot be prepared** (PREPARE TRANSACTION):
//!   it would outlive its session, and no wait could find what it sealed.
//!
//! The command needs the library in `shared_preload_libraries`, as every key does.

pub mod run;

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, c_void};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, pg_sys, PGRXSharedMemory, PgAtomic, PgLwLock};
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PgLogLevel, PgSqlErrorCode};
use provider_keys_encrypt_core::key_command::{
    self as core_command, KeyCommandError, KeyCommandVars, MAX_OUTPUT_BYTES, NAMES,
};
use zeroize::{Zeroize, Zeroizing};

use crate::errors::Error;

/// `provider_keys_encrypt.key_command`: a command that prints the key variables (postgresql.conf
/// or ALTER SYSTEM only; run at start and after each reload).
pub static KEY_COMMAND: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(None);
/// `provider_keys_encrypt.key_command_timeout`: how long the command may take, in ms.
pub static KEY_COMMAND_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// How many good outputs shared memory keeps (the newest and three before it).
const KEPT: usize = 4;

/// One good output of the command, validated before it was stored.
#[derive(Clone, Copy)]
#[repr(C)]
struct Output {
    generation: u64,
    len: u32,
    bytes: [u8; MAX_OUTPUT_BYTES],
}

/// What the server knows of the command, in shared memory under one LWLock.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Shared {
    /// the reload count the last finished run answered (0: none yet)
    answered: u64,
    /// the newest good output's generation (0: none yet)
    newest: u64,
    /// runs since the server started
    runs: u64,
    /// the last run failed: its error, as core's `KeyCommandError::to_parts`
    failed: bool,
    error_kind: u8,
    error_number: u64,
    error_len: u16,
    error_text: [u8; 256],
    outputs: [Output; KEPT],
}

// SAFETY: plain bytes and integers, no pointers: the same in every process.
unsafe impl PGRXSharedMemory for Shared {}

impl Shared {
    const fn new() -> Shared {
        Shared {
            answered: 0,
            newest: 0,
            runs: 0,
            failed: false,
            error_kind: 0,
            error_number: 0,
            error_len: 0,
            error_text: [0; 256],
            outputs: [Output {
                generation: 0,
                len: 0,
                bytes: [0; MAX_OUTPUT_BYTES],
            }; KEPT],
        }
    }

    fn last_error(&self) -> Option<KeyCommandError> {
        if !self.failed {
            return None;
        }
        let text = &self.error_text[..usize::from(self.error_len).min(self.error_text.len())];
        KeyCommandError::from_parts(
            self.error_kind,
            self.error_number,
            String::from_utf8_lossy(text).into_owned(),
        )
    }

    /// A wiping copy of the output of `generation`, if it is still kept.
    fn output(&self, generation: u64) -> Option<Zeroizing<Vec<u8>>> {
        let slot = &self.outputs[(generation % KEPT as u64) as usize];
        (generation != 0 && slot.generation == generation)
            .then(|| Zeroizing::new(slot.bytes[..slot.len as usize].to_vec()))
    }
}

static SHARED: PgLwLock<Shared> = unsafe { PgLwLock::new(c"provider_keys_encrypt key_command") };
/// Configuration reloads the postmaster has done (1 at start).
static RELOADS: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"provider_keys_encrypt key_command reloads") };
/// The process running the command now: its pid in the high 32 bits, the Unix second it
/// started in the low 32 (0: none).
static RUNNER: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"provider_keys_encrypt key_command runner") };
/// Set in the postmaster once shared memory exists (inherited by every process it forks).
static SHARED_READY: AtomicBool = AtomicBool::new(false);

/// A backend's slot (see the module doc). 0 in `generation`/`oldest`: no key command keys.
#[repr(C)]
struct Slot {
    generation: AtomicU64,
    oldest: AtomicU64,
    pid: AtomicI32,
}

/// The slots, one per proc number, in shared memory of their own (their count depends on
/// max_connections and the like, known only at start).
static mut SLOTS: *const Slot = std::ptr::null();
static mut SLOT_COUNT: usize = 0;
const SLOTS_NAME: &std::ffi::CStr = c"provider_keys_encrypt key_command slots";

/// How many slots: every backend and background worker has a proc number below MaxBackends
/// (plus one: before PostgreSQL 17, backend ids start at 1).
fn slot_count() -> usize {
    // SAFETY: a plain read of a global, set before shared memory is requested.
    usize::try_from(unsafe { pg_sys::MaxBackends }).unwrap_or(0) + 1
}

/// This process's proc number (backend id before PostgreSQL 17).
fn my_index() -> i64 {
    // SAFETY: plain reads of globals.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    let i = unsafe { pg_sys::MyProcNumber };
    #[cfg(not(any(feature = "pg17", feature = "pg18")))]
    let i = unsafe { pg_sys::MyBackendId };
    i64::from(i)
}

/// In a parallel worker, its leader's proc number.
fn leader_index() -> i64 {
    // SAFETY: plain reads of globals.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    let i = unsafe { pg_sys::ParallelLeaderProcNumber };
    #[cfg(not(any(feature = "pg17", feature = "pg18")))]
    let i = unsafe { pg_sys::ParallelLeaderBackendId };
    i64::from(i)
}

fn slot(index: i64) -> Option<&'static Slot> {
    // SAFETY: SLOTS points at SLOT_COUNT slots in shared memory once set, for the life of the
    // process; atomics make shared access sound.
    unsafe {
        let (slots, count) = (SLOTS, SLOT_COUNT);
        let i = usize::try_from(index).ok().filter(|i| *i < count)?;
        (!slots.is_null()).then(|| &*slots.add(i))
    }
}

fn my_slot() -> Option<&'static Slot> {
    slot(my_index())
}
/// What the runner logs about the environment: the key variables it holds (names only).
static ENVIRONMENT_NAMES: OnceLock<fn() -> Vec<&'static str>> = OnceLock::new();

/// The keys this process uses while a key command is set.
#[derive(Clone)]
pub enum Keys {
    /// the output of one generation, parsed
    Command(Rc<KeyCommandVars>),
    /// no good output to use (the command never succeeded, or a worker lost its leader's)
    Failed(KeyCommandError),
}

thread_local! {
    /// The reload count this process last saw (its assign hook); inherited from the postmaster.
    static WANT: Cell<u64> = const { Cell::new(1) };
    /// The reload count this process's keys answer (0: not looked yet).
    static SEEN: Cell<u64> = const { Cell::new(0) };
    /// The keys this process uses, with their generation (`None`: no key command is set).
    static KEYS: RefCell<Option<(u64, Keys)>> = const { RefCell::new(None) };
    /// Moves each time this process's keys change: part of `settings::epoch`.
    static CHANGES: Cell<u64> = const { Cell::new(0) };
    static EXIT_HOOK: Cell<bool> = const { Cell::new(false) };
    /// Has the current transaction used keys (its slot's `oldest` is set)?
    static USED_IN_XACT: Cell<bool> = const { Cell::new(false) };
}

/// Define the two settings (called by `settings::init`, before the prefix is reserved).
pub fn define_settings() {
    // SAFETY: the hook is an `extern "C-unwind"` function with the signature guc.c expects.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"provider_keys_encrypt.key_command",
            c"A command that prints the key variables (NAME=value lines), run at server start and again after each configuration reload.",
            c"Run as /bin/sh -c <command> by the server's OS user, once for the whole server, with a time limit (key_command_timeout); its output is never logged. When set, the keys it prints are used instead of the server's environment. Set it in postgresql.conf or with ALTER SYSTEM, then SELECT pg_reload_conf().",
            &KEY_COMMAND,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            None,
            Some(assign_key_command),
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"provider_keys_encrypt.key_command_timeout",
        c"How long provider_keys_encrypt.key_command may run before it is killed.",
        c"The command, and every process it started, is killed past this time; the keys fetched before stay in use.",
        &KEY_COMMAND_TIMEOUT,
        100,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS | GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
    );
}

/// Ask for the shared memory and install the hooks (the postmaster, preloading).
/// `environment_names` gives the key variables the server's environment holds (names only),
/// for the LOG line that says the command wins over them.
pub fn init_shared_memory(environment_names: fn() -> Vec<&'static str>) {
    let _ = ENVIRONMENT_NAMES.set(environment_names);
    pg_shmem_init!(SHARED = Shared::new());
    pg_shmem_init!(RELOADS = AtomicU64::new(1));
    pg_shmem_init!(RUNNER = AtomicU64::new(0));
    // SAFETY: _PG_init runs once in the postmaster; each hook calls the one it replaced.
    unsafe {
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        {
            PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(shmem_request);
        }
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        pg_sys::RequestAddinShmemSpace(slots_size());
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        pg_sys::RegisterXactCallback(Some(transaction_end), std::ptr::null_mut());
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;

fn slots_size() -> usize {
    slot_count() * std::mem::size_of::<Slot>()
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: the hook this one replaced, then a request PostgreSQL allows in this hook.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(slots_size());
    }
}

/// At the end of a top-level transaction: its keys are committed (or gone). Inside a CALL
/// that commits (a portal is still running) the statement goes on with the same keys, so the
/// slot keeps them as the oldest in use.
#[pg_guard]
unsafe extern "C-unwind" fn transaction_end(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    if event == XACT_EVENT_PRE_PREPARE {
        // keys used by this session or by its parallel workers (which mark this slot)
        let used_command_keys = my_slot().is_some_and(|s| s.oldest.load(Ordering::Acquire) != 0);
        if used_command_keys {
            // a prepared transaction outlives its session: no wait could find what it sealed
            Error::PrepareWithCommandKeys.raise();
        }
    }
    if !matches!(
        event,
        XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PREPARE
    ) {
        return;
    }
    USED_IN_XACT.with(|u| u.set(false));
    if let Some(slot) = my_slot() {
        // SAFETY: a plain read of a global.
        let in_statement = unsafe { !pg_sys::ActivePortal.is_null() };
        let keep = if in_statement {
            slot.generation.load(Ordering::Relaxed)
        } else {
            0
        };
        slot.oldest.store(keep, Ordering::Release);
    }
}

/// After pgrx's hooks made the shared memory (at start and after a crash's reset): the
/// postmaster runs the command once, straight into shared memory.
#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: the hook this one replaced, called first as PostgreSQL expects.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
    }
    // SAFETY: as pgrx does for its own structures: under AddinShmemInitLock, a named struct
    // of the size requested, zeroed by whoever creates it.
    unsafe {
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let slots = pg_sys::ShmemInitStruct(SLOTS_NAME.as_ptr(), slots_size(), &mut found);
        if !found {
            std::ptr::write_bytes(slots.cast::<u8>(), 0, slots_size());
        }
        SLOTS = slots.cast::<Slot>().cast_const();
        SLOT_COUNT = slot_count();
        pg_sys::LWLockRelease(lock);
    }
    SHARED_READY.store(true, Ordering::Relaxed);
    // SAFETY: a plain read of a global.
    if unsafe { pg_sys::IsUnderPostmaster } {
        return; // EXEC_BACKEND children attach; only the postmaster runs the command
    }
    // after a crash's reset the count starts where the postmaster is
    let reloads = WANT.with(Cell::get).max(1);
    RELOADS.get().store(reloads, Ordering::Relaxed);
    if command().is_some() {
        run_and_publish(reloads);
    }
}

/// The assign hook of `key_command`: PostgreSQL calls it whenever it (re)reads the
/// configuration (unchanged values too). In the postmaster it counts a reload; in any other
/// process it notes the count, and the next need of a key answers it.
#[pg_guard]
unsafe extern "C-unwind" fn assign_key_command(_new: *const c_char, _extra: *mut c_void) {
    if !SHARED_READY.load(Ordering::Relaxed) {
        return; // the postmaster's first read of the configuration, or not preloaded
    }
    // SAFETY: a plain read of a global.
    let postmaster = unsafe { !pg_sys::IsUnderPostmaster };
    let count = if postmaster {
        RELOADS.get().fetch_add(1, Ordering::AcqRel) + 1
    } else {
        RELOADS.get().load(Ordering::Acquire)
    };
    WANT.with(|w| w.set(count));
}

// The executor's start, unguarded: a PostgreSQL error raised inside it passes over
// `executor_start`'s frame as it would over a C function's (the frame holds nothing to drop),
// instead of being turned into a Rust panic and raised again.
extern "C-unwind" {
    #[link_name = "standard_ExecutorStart"]
    fn standard_executor_start(query: *mut pg_sys::QueryDesc, eflags: c_int);
}

/// The ExecutorStart hook: [`before_parallel_plan`], then the hook it replaced (or the
/// standard executor), called directly.
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: c_int) {
    // SAFETY: guarded (an error in it is raised as PostgreSQL's); query is the executor's.
    unsafe { before_parallel_plan(query) };
    // SAFETY: the previous hook or the standard executor, with the executor's arguments.
    unsafe {
        match PREV_EXECUTOR_START {
            Some(prev) => prev(query, eflags),
            None => standard_executor_start(query, eflags),
        }
    }
}

/// When a parallel plan starts (outside parallel mode) in a backend with a key command and a
/// reload it has not answered: answer it now, before the workers start, so that the statement,
/// workers and leader, runs under the new keys (the workers find them in its slot). A backend
/// keeps its keys for the whole parallel statement.
#[pg_guard]
unsafe extern "C-unwind" fn before_parallel_plan(query: *mut pg_sys::QueryDesc) {
    // SAFETY: query is the executor's valid QueryDesc; plannedstmt is set before this hook.
    let parallel = unsafe {
        !query.is_null()
            && !(*query).plannedstmt.is_null()
            && (*(*query).plannedstmt).parallelModeNeeded
    };
    // SAFETY: a plain read of the transaction state.
    let in_parallel_mode = unsafe { pg_sys::IsInParallelMode() };
    if parallel
        && !is_parallel_worker()
        && !in_parallel_mode
        && SEEN.with(Cell::get) != WANT.with(Cell::get)
        && SHARED_READY.load(Ordering::Relaxed)
        && command().is_some()
    {
        refresh();
    }
}

fn is_parallel_worker() -> bool {
    // SAFETY: a plain read of a global (IsParallelWorker() is this comparison).
    unsafe { pg_sys::ParallelWorkerNumber >= 0 }
}

/// The command's text, if one is set (blank is none).
fn command() -> Option<String> {
    KEY_COMMAND
        .get()
        .and_then(|c| c.to_str().ok().map(|c| c.trim().to_owned()))
        .filter(|c| !c.is_empty())
}

/// The keys this process uses, `None` when no key command is set (the environment's keys).
/// Answers a pending reload first.
pub fn keys() -> Option<Keys> {
    refresh();
    KEYS.with(|k| k.borrow().as_ref().map(|(_, keys)| keys.clone()))
}

/// Moves each time this process's keys change (for the keyrings' epoch).
pub fn changes() -> u64 {
    CHANGES.with(Cell::get)
}

/// Answer a reload this process has not answered yet, and note that the transaction uses
/// keys; a comparison and a flag otherwise.
pub fn refresh() {
    if !SHARED_READY.load(Ordering::Relaxed) {
        return;
    }
    let want = WANT.with(Cell::get);
    if SEEN.with(Cell::get) != want {
        refresh_slow(want);
    }
    if !USED_IN_XACT.with(Cell::get) {
        mark_used();
    }
}

/// The first use of keys in a transaction: the slot's `oldest` is the keys it uses now.
/// A parallel worker marks its leader's slot: the leader's transaction used keys too (its
/// PREPARE is refused, a re-encryption waits for it).
fn mark_used() {
    USED_IN_XACT.with(|u| u.set(true));
    let generation = KEYS.with(|k| k.borrow().as_ref().map_or(0, |(g, _)| *g));
    let target = if is_parallel_worker() {
        slot(leader_index())
    } else {
        my_slot()
    };
    if let (Some(slot), true) = (target, generation != 0) {
        // the oldest generation the transaction used: only ever lowered (or set from 0)
        let _ = slot
            .oldest
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |oldest| {
                (oldest == 0 || generation < oldest).then_some(generation)
            });
    }
}

fn refresh_slow(want: u64) {
    let leading = SEEN.with(Cell::get) != 0 && !is_parallel_worker() && {
        // SAFETY: a plain read of the transaction state.
        unsafe { pg_sys::IsInParallelMode() }
    };
    if leading {
        return; // workers use this backend's keys: they change after the parallel statement
    }
    let keys = if command().is_none() {
        None
    } else if is_parallel_worker() {
        Some(leader_keys())
    } else {
        Some(answer(want))
    };
    SEEN.with(|s| s.set(want));
    if !is_parallel_worker() {
        publish(keys.as_ref().map_or(0, |(g, _)| *g));
    }
    let changed = KEYS.with(|k| {
        let mut k = k.borrow_mut();
        let same = match (&*k, &keys) {
            (None, None) => true,
            (Some((a, Keys::Command(_))), Some((b, Keys::Command(_)))) => a == b,
            _ => false,
        };
        *k = keys;
        !same
    });
    if changed {
        CHANGES.with(|c| c.set(c.get() + 1));
    }
}

/// This backend's keys, in its slot: for its parallel workers, and for
/// [`wait_for_older_keys`]. A transaction that used older keys keeps them as its oldest.
/// The slot is this process's from its first publish to its exit; `at_exit` empties it (by
/// this index: at proc exit PostgreSQL has already given up the proc number).
static MY_SLOT: AtomicI64 = AtomicI64::new(-1);

fn publish(generation: u64) {
    let Some(slot) = my_slot() else { return };
    if !EXIT_HOOK.with(Cell::get) {
        // SAFETY: registers a callback PostgreSQL calls at this process's exit.
        unsafe { pg_sys::on_proc_exit(Some(at_exit), pg_sys::Datum::from(0)) };
        EXIT_HOOK.with(|h| h.set(true));
    }
    MY_SLOT.store(my_index(), Ordering::Relaxed);
    // SAFETY: a plain read of a global.
    slot.pid
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Relaxed);
    slot.generation.store(generation, Ordering::Release);
}

/// In a parallel worker: the output its leader uses, never a run.
fn leader_keys() -> (u64, Keys) {
    let generation = slot(leader_index()).map_or(0, |s| s.generation.load(Ordering::Acquire));
    let found = {
        let shared = SHARED.share();
        if generation == 0 {
            Err(shared.last_error().unwrap_or(KeyCommandError::Moved))
        } else {
            shared.output(generation).ok_or(KeyCommandError::Moved)
        }
    };
    (generation, parsed(found))
}

/// An output from shared memory as keys (it was validated before it was stored).
fn parsed(output: Result<Zeroizing<Vec<u8>>, KeyCommandError>) -> Keys {
    match output.and_then(|out| core_command::parse(&out)) {
        Ok(vars) => Keys::Command(Rc::new(vars)),
        Err(e) => Keys::Failed(e),
    }
}

/// In a backend: the answer to reload `want`, from shared memory, or from a run of the command
/// if none has answered it yet (one runner at a time; the others wait, interruptibly).
fn answer(want: u64) -> (u64, Keys) {
    loop {
        {
            let shared = SHARED.share();
            if shared.answered >= want {
                let newest = shared.newest;
                // keep the keys this process has if they are the newest (no copy)
                let have = KEYS.with(|k| match &*k.borrow() {
                    Some((g, Keys::Command(vars))) if *g == newest => Some(vars.clone()),
                    _ => None,
                });
                // in the slot before the lock is released: a re-encryption that publishes a
                // newer output afterwards finds this session holding this one
                publish(newest);
                if let Some(vars) = have {
                    return (newest, Keys::Command(vars));
                }
                let output = if newest == 0 {
                    Err(shared.last_error().unwrap_or(KeyCommandError::NoKeys))
                } else {
                    shared.output(newest).ok_or(KeyCommandError::Moved)
                };
                drop(shared);
                return (newest, parsed(output));
            }
        }
        if let Some(claim) = Claim::take() {
            run_and_publish(RELOADS.get().load(Ordering::Acquire));
            drop(claim);
            continue;
        }
        // another process runs it: wait for its answer
        std::thread::sleep(Duration::from_millis(5));
        pgrx::check_for_interrupts!();
    }
}

/// This process's turn to run the command; released when dropped (an unwinding cancel too).
struct Claim(u64);

impl Claim {
    fn take() -> Option<Claim> {
        let runner = RUNNER.get();
        // SAFETY: plain reads of globals.
        let pid = u64::from(unsafe { pg_sys::MyProcPid } as u32);
        let now = unix_seconds();
        let mine = (pid << 32) | (now & 0xffff_ffff);
        let current = runner.load(Ordering::Acquire);
        if current != 0 && !stale(current, now) {
            return None;
        }
        let claim = runner
            .compare_exchange(current, mine, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Claim(mine));
        if claim.is_some() {
            CLAIMED.store(mine, Ordering::Relaxed);
        }
        claim
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        release(self.0);
    }
}

/// The claim this process holds (0: none), released at exit too (a FATAL does not unwind).
static CLAIMED: AtomicU64 = AtomicU64::new(0);

fn release(claim: u64) {
    CLAIMED.store(0, Ordering::Relaxed);
    let _ = RUNNER
        .get()
        .compare_exchange(claim, 0, Ordering::AcqRel, Ordering::Acquire);
}

/// A runner that is gone (a FATAL, a crash) or past its time and a margin.
fn stale(runner: u64, now: u64) -> bool {
    let pid = (runner >> 32) as i32;
    let started = runner & 0xffff_ffff;
    let limit = u64::try_from(KEY_COMMAND_TIMEOUT.get()).unwrap_or(10_000) / 1000 + 5;
    // SAFETY: signal 0 only checks that the process exists.
    let gone = unsafe { libc::kill(pid, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    gone || (now & 0xffff_ffff).wrapping_sub(started) > limit
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Run the command, validate its output (core's parse builds every keyring it gives), and
/// publish the answer to reload `reloads`: a good output becomes the newest generation; a
/// failure keeps the newest as it is. Logs the outcome once (names and SQLSTATEs only).
fn run_and_publish(reloads: u64) {
    let Some(command) = command() else { return };
    // SAFETY: plain reads of globals.
    let in_backend = unsafe { pg_sys::IsUnderPostmaster };
    if in_backend && !EXIT_HOOK.with(Cell::get) {
        // SAFETY: registers a callback PostgreSQL calls at this process's exit.
        unsafe { pg_sys::on_proc_exit(Some(at_exit), pg_sys::Datum::from(0)) };
        EXIT_HOOK.with(|h| h.set(true));
    }
    let timeout = Duration::from_millis(u64::try_from(KEY_COMMAND_TIMEOUT.get()).unwrap_or(10_000));
    // A run is not interrupted: a cancel or terminate request of the session running it takes
    // effect when it ends, within key_command_timeout. Otherwise any role could cancel its own
    // statements to make the server start the command again and again, and push back everyone
    // else's keys (sessions waiting for the run stay cancellable).
    let mut tick = || {};
    let output = run::run(&command, timeout, &mut tick)
        .and_then(|out| core_command::parse(&out).map(|vars| (out, vars)));
    let (generation, kept) = {
        let mut shared = SHARED.exclusive();
        shared.answered = shared.answered.max(reloads);
        shared.runs += 1;
        match &output {
            Ok((out, _)) => {
                let generation = shared.newest + 1;
                let slot = &mut shared.outputs[(generation % KEPT as u64) as usize];
                slot.bytes.zeroize();
                slot.bytes[..out.len()].copy_from_slice(out);
                slot.len = out.len() as u32;
                slot.generation = generation;
                shared.newest = generation;
                shared.failed = false;
            }
            Err(e) => {
                let (kind, number, text) = e.to_parts();
                let text = text.as_bytes();
                let len = text.len().min(shared.error_text.len());
                shared.error_text.zeroize();
                shared.error_text[..len].copy_from_slice(&text[..len]);
                shared.error_len = len as u16;
                shared.error_kind = kind;
                shared.error_number = number;
                shared.failed = true;
            }
        }
        (shared.newest, shared.newest != 0)
    };
    match output {
        Ok((_, vars)) => log_keys(generation, &vars),
        Err(e) => {
            let what = if kept {
                "the keys it gave before stay in use"
            } else {
                "no keys are in use until it succeeds"
            };
            let err = Error::from(e);
            ErrorReport::new(
                err.sqlstate(),
                format!("provider_keys_encrypt: {err}; {what}"),
                "provider_keys_encrypt",
            )
            .set_hint(err.hint().unwrap_or_default())
            .report(PgLogLevel::LOG);
        }
    }
}

/// At this process's exit (a FATAL does not unwind): kill a command still running, release
/// the claim, empty the slot.
#[pg_guard]
unsafe extern "C-unwind" fn at_exit(_code: i32, _arg: pg_sys::Datum) {
    run::kill_at_exit();
    let claim = CLAIMED.load(Ordering::Relaxed);
    if claim != 0 {
        release(claim);
    }
    if let Some(slot) = slot(MY_SLOT.load(Ordering::Relaxed)) {
        slot.oldest.store(0, Ordering::Release);
        slot.generation.store(0, Ordering::Release);
        slot.pid.store(0, Ordering::Release);
    }
}

/// The LOG lines of a good run: what it gave (names only), and what of the environment it
/// replaces.
fn log_keys(generation: u64, vars: &KeyCommandVars) {
    let printed = [&vars.current, &vars.previous, &vars.gateway];
    let names: Vec<&str> = NAMES
        .iter()
        .zip(printed)
        .filter(|(_, v)| v.is_some())
        .map(|(n, _)| *n)
        .collect();
    let log = |msg: String| {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            msg,
            "provider_keys_encrypt",
        )
        .report(PgLogLevel::LOG)
    };
    log(format!(
        "provider_keys_encrypt: key_command gave {} (generation {generation})",
        names.join(", ")
    ));
    let environment = ENVIRONMENT_NAMES.get().map(|f| f()).unwrap_or_default();
    if !environment.is_empty() {
        log(format!(
            "provider_keys_encrypt: key_command is set, so the keys it prints are used, not {} from the server's environment",
            environment.join(", ")
        ));
    }
}

/// For SHOW: the newest good output (parsed), the last run's error, and whether a reload is
/// waiting for a run; from shared memory only (never a run). `None` when no key command is set.
pub fn newest() -> Option<(Option<KeyCommandVars>, Option<KeyCommandError>, bool)> {
    if !SHARED_READY.load(Ordering::Relaxed) || command().is_none() {
        return None;
    }
    let reloads = RELOADS.get().load(Ordering::Acquire);
    let (output, error, pending) = {
        let shared = SHARED.share();
        (
            shared.output(shared.newest),
            shared.last_error(),
            shared.answered < reloads,
        )
    };
    let vars = output.and_then(|out| core_command::parse(&out).ok());
    Some((vars, error, pending))
}

/// Did a configuration reload arrive that this statement does not use yet, while a key
/// command gives the keys? The run summary says so: the run used the keys it started with.
pub fn reload_pending() -> bool {
    if !SHARED_READY.load(Ordering::Relaxed) || KEYS.with(|k| k.borrow().is_none()) {
        return false;
    }
    // SAFETY: a plain read of a flag the SIGHUP handler sets.
    let signalled = unsafe { pg_sys::ConfigReloadPending } != 0;
    signalled || RELOADS.get().load(Ordering::Acquire) != WANT.with(Cell::get)
}

/// Wait until no other session's transaction (or CALL) still uses keys from before this
/// session's: `reencrypt_provider_keys` calls it first, so that no session goes on sealing
/// under a previous key while the run re-encrypts and says that key can be removed. Waits on
/// each such transaction as CREATE INDEX CONCURRENTLY waits on older ones (a lock wait:
/// lock_timeout, statement_timeout and a cancel apply), with a NOTICE naming their pids.
/// Returns how many sessions it waited for (0 at once without a key command).
pub fn wait_for_older_keys() -> Result<i32, Error> {
    refresh();
    let mine = match KEYS.with(|k| k.borrow().clone()) {
        Some((generation, Keys::Command(_))) => generation,
        Some((_, Keys::Failed(e))) => return Err(e.into()),
        None => return Ok(0),
    };
    let mut waited = std::collections::BTreeSet::new();
    let mut told = Vec::new();
    let mut idle_rounds = 0;
    loop {
        // a transaction that used older keys (through a CALL's COMMITs too), or one running
        // now in a session that holds older keys (a statement that began before it took the
        // reload seals under them when it gets to a key)
        let running = running_transactions();
        let older: Vec<(i64, i32)> = (0..slot_count() as i64)
            .filter(|i| *i != my_index())
            .filter_map(|i| slot(i).map(|s| (i, s)))
            .filter(|(i, s)| {
                let oldest = s.oldest.load(Ordering::Acquire);
                let holds = s.generation.load(Ordering::Acquire);
                (oldest != 0 && oldest < mine)
                    || (holds != 0 && holds < mine && running.iter().any(|(b, _)| b == i))
            })
            .map(|(i, s)| (i, s.pid.load(Ordering::Relaxed)))
            .collect();
        if older.is_empty() {
            return Ok(i32::try_from(waited.len()).unwrap_or(i32::MAX));
        }
        let pids: Vec<i32> = older.iter().map(|(_, pid)| *pid).collect();
        if pids != told {
            pgrx::notice!(
                "waiting for {} session(s) whose transaction or CALL still uses the keys from before the last reload (pid {}): what they write is sealed under those keys",
                pids.len(),
                pids.iter().map(i32::to_string).collect::<Vec<_>>().join(", ")
            );
            told = pids.clone();
        }
        waited.extend(pids);
        if wait_on(&older) {
            idle_rounds = 0;
        } else {
            // between two transactions of a CALL for a moment; a slot that stays set with no
            // transaction for 2 s belongs to no running statement
            idle_rounds += 1;
            if idle_rounds > 200 {
                return Ok(i32::try_from(waited.len()).unwrap_or(i32::MAX));
            }
        }
    }
}

/// The transactions running now in any database, with the proc number of their backend.
fn running_transactions() -> Vec<(i64, pg_sys::VirtualTransactionId)> {
    let mut count = 0;
    // SAFETY: GetCurrentVirtualXIDs returns a palloc'd array of `count` entries.
    let vxids = unsafe {
        pg_sys::GetCurrentVirtualXIDs(pg_sys::InvalidTransactionId, false, true, 0, &mut count)
    };
    (0..usize::try_from(count).unwrap_or(0))
        .map(|i| {
            // SAFETY: i < count.
            let vxid = unsafe { *vxids.add(i) };
            #[cfg(any(feature = "pg17", feature = "pg18"))]
            let index = i64::from(vxid.procNumber);
            #[cfg(not(any(feature = "pg17", feature = "pg18")))]
            let index = i64::from(vxid.backendId);
            (index, vxid)
        })
        .collect()
}

/// Wait on the current transaction of each of these backends (by proc number), in any
/// database; false if none had one (between two transactions of a CALL, for a moment): then a
/// short sleep.
fn wait_on(backends: &[(i64, i32)]) -> bool {
    let mut waited = false;
    for (index, vxid) in running_transactions() {
        if backends.iter().any(|(b, _)| *b == index) {
            // SAFETY: a lock wait on a transaction that was running a moment ago.
            unsafe { pg_sys::VirtualXactLock(vxid, true) };
            waited = true;
        }
    }
    if !waited {
        std::thread::sleep(Duration::from_millis(10));
    }
    pgrx::check_for_interrupts!();
    waited
}
