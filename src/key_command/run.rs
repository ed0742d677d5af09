//! Running `provider_keys_encrypt.key_command`: the operator's command that prints the key
//! variables (its output's format: core's `key_command`).
//!
//! The command is the superuser's own text from postgresql.conf (or ALTER SYSTEM): it is run
//! as `/bin/sh -c <command>` with nothing a client controls put into it, with no standard
//! input, its standard error discarded (it may echo what it read) and its standard output read
//! into a buffer that is wiped on drop, at most 64 KiB and allocated whole before the first
//! read (no reallocation leaves a copy behind). It inherits none of the backend's open files
//! (sockets, data files): every descriptor above standard error is closed at exec. It runs in
//! a process group of its own: past the timeout the whole group is killed, so a pipeline or a
//! child that keeps the pipe open cannot hang the server; so it is when the caller's `tick`
//! unwinds (a cancel or terminate request) and when the process exits ([`kill_at_exit`]). Its
//! output is never logged, echoed, or written to a file.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use provider_keys_encrypt_core::key_command::{KeyCommandError, MAX_OUTPUT_BYTES};
use zeroize::Zeroizing;

/// The process group of the command running now (0: none), for [`kill_at_exit`].
static RUNNING_GROUP: AtomicI32 = AtomicI32::new(0);

/// How often, at least, `run` calls its caller's `tick` while it waits.
const TICK: Duration = Duration::from_millis(50);

/// The child while it runs: dropped before it was reaped (an error, a panic or an unwinding
/// `tick`), it kills the command's process group and reaps the command.
struct Running(Child, bool);

impl Drop for Running {
    fn drop(&mut self) {
        if !self.1 {
            kill_group(&self.0);
            let _ = self.0.wait();
        }
        RUNNING_GROUP.store(0, Ordering::Relaxed);
    }
}

/// Kill the command still running when the process exits (a FATAL, a terminate request):
/// registered with PostgreSQL's `on_proc_exit`.
pub fn kill_at_exit() {
    let group = RUNNING_GROUP.swap(0, Ordering::Relaxed);
    if group > 0 {
        // SAFETY: signals the process group of the command this process started.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
}

/// Run `command` and return what it printed, or why not. `tick` is called at least every
/// 50 ms while the command runs; it may unwind (PostgreSQL's interrupt check), which kills
/// the command.
pub fn run(
    command: &str,
    timeout: Duration,
    tick: &mut dyn FnMut(),
) -> Result<Zeroizing<Vec<u8>>, KeyCommandError> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe system calls (close_range, fcntl, getrlimit).
    unsafe {
        cmd.pre_exec(|| {
            close_inherited();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| KeyCommandError::Spawn(e.kind().to_string()))?;
    RUNNING_GROUP.store(i32::try_from(child.id()).unwrap_or(0), Ordering::Relaxed);
    let mut running = Running(child, false);
    let child = &mut running.0;
    let deadline = Instant::now() + timeout;
    let timed_out = || KeyCommandError::TimedOut(timeout.as_millis() as u64);
    let read = read_until(child, deadline, tick);
    let outcome = read.and_then(|out| {
        // the output ended: wait for the command itself, within the same deadline
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(out),
                Ok(Some(status)) => {
                    return Err(KeyCommandError::Failed(match status.code() {
                        Some(code) => format!("exit status {code}"),
                        None => format!("killed by signal {}", status.signal().unwrap_or(0)),
                    }))
                }
                Ok(None) if Instant::now() >= deadline => return Err(timed_out()),
                Ok(None) => {
                    tick();
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(KeyCommandError::Failed(e.kind().to_string())),
            }
        }
    });
    // reaped when it exited; an error kills and reaps it (Running's drop)
    running.1 = outcome.is_ok();
    drop(running);
    outcome.map_err(|e| match e {
        KeyCommandError::TimedOut(_) => timed_out(),
        e => e,
    })
}

/// In the child before exec: mark every descriptor above standard error close-on-exec, so
/// the command inherits none of the backend's (the pipe is already its standard output).
fn close_inherited() {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only changes descriptor flags.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        )
    } == 0;
    if done {
        return;
    }
    // kernels before 5.11: each descriptor up to the limit
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct given.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.min(1 << 20) as libc::c_int
    } else {
        1024
    };
    for fd in 3..max {
        // SAFETY: fcntl on a descriptor that may not be open fails with EBADF, harmlessly.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// Read the child's standard output until it ends, the deadline passes or it is too long.
fn read_until(
    child: &mut Child,
    deadline: Instant,
    tick: &mut dyn FnMut(),
) -> Result<Zeroizing<Vec<u8>>, KeyCommandError> {
    let mut stdout = child.stdout.take().expect("stdout is piped");
    // the whole bound at once: the output never moves, so no copy is left unwiped
    let mut out = Zeroizing::new(Vec::with_capacity(MAX_OUTPUT_BYTES));
    let mut buf = Zeroizing::new([0u8; 4096]);
    loop {
        tick();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(KeyCommandError::TimedOut(0));
        }
        let left = left.min(TICK);
        let mut pfd = libc::pollfd {
            fd: stdout.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for a file descriptor this function owns (the pipe).
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(KeyCommandError::Failed(
                "could not wait for its output".into(),
            ));
        }
        if ready == 0 {
            continue; // the deadline and the tick are checked above
        }
        // readable or hung up: this read does not block
        match stdout.read(&mut buf[..]) {
            Ok(0) => return Ok(out),
            Ok(n) if out.len() + n > MAX_OUTPUT_BYTES => return Err(KeyCommandError::TooLarge),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(KeyCommandError::Failed(e.kind().to_string())),
        }
    }
}

/// Kill the command's process group (its children too).
fn kill_group(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signals the process group the child leads (process_group(0) above).
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(400);

    fn run(command: &str, timeout: Duration) -> Result<Zeroizing<Vec<u8>>, KeyCommandError> {
        super::run(command, timeout, &mut || {})
    }

    #[test]
    fn output_status_timeout_and_size() {
        assert_eq!(
            &run("printf 'ENCRYPTION_KEY=x\\n'; echo noise >&2", SHORT).unwrap()[..],
            b"ENCRYPTION_KEY=x\n"
        );
        assert_eq!(
            run("echo sk-secret; exit 3", SHORT).err(),
            Some(KeyCommandError::Failed("exit status 3".into()))
        );
        assert_eq!(
            run("kill -9 $$", SHORT).err(),
            Some(KeyCommandError::Failed("killed by signal 9".into()))
        );
        let started = Instant::now();
        // a child that keeps the pipe open is killed with its group
        assert_eq!(
            run("sleep 30 & echo partial; wait", SHORT).err(),
            Some(KeyCommandError::TimedOut(400))
        );
        assert_eq!(
            run("exec sleep 30", SHORT).err(),
            Some(KeyCommandError::TimedOut(400))
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            run("head -c 70000 /dev/zero", SHORT).err(),
            Some(KeyCommandError::TooLarge)
        );
        // no descriptor of the caller's but the three standard ones reaches the command
        // (dup gives a descriptor without close-on-exec, as a backend's sockets are)
        let file = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: dup of an open descriptor; closed below.
        let inherited = unsafe { libc::dup(file.as_raw_fd()) };
        assert!(inherited > 2);
        let fds = run("ls /proc/self/fd", SHORT).unwrap();
        // SAFETY: the descriptor dup gave above.
        unsafe { libc::close(inherited) };
        let fds: Vec<&[u8]> = fds
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        // 0, 1, 2 and the directory ls reads
        assert_eq!(fds.len(), 4, "{:?}", String::from_utf8_lossy(&fds.concat()));
        // a tick that unwinds kills the command at once
        let started = Instant::now();
        let mut ticks = 0;
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::run("exec sleep 30", Duration::from_secs(60), &mut || {
                ticks += 1;
                if ticks == 3 {
                    panic!("cancel");
                }
            })
        }));
        assert!(unwound.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(RUNNING_GROUP.load(Ordering::Relaxed), 0);
        for e in [
            run("echo sk-secret; exit 3", SHORT).err().unwrap(),
            run("echo sk-secret; exec sleep 30", SHORT).err().unwrap(),
        ] {
            assert!(!e.to_string().contains("sk-secret"), "{e}");
        }
    }
}
