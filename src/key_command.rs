//! Running `provider_keys_encrypt.key_command`: the operator's command that prints the key
//! variables (its output's format: core's `key_command`).
//!
//! The command is the superuser's own text from postgresql.conf (or ALTER SYSTEM): it is run
//! as `/bin/sh -c <command>` with nothing a client controls put into it, with no standard
//! input, its standard error discarded (it may echo what it read) and its standard output read
//! into a buffer that is wiped on drop, at most 64 KiB. It runs in a process group of its own:
//! past the timeout the whole group is killed, so a pipeline or a child that keeps the pipe
//! open cannot hang the server. Its output is never logged, echoed, or written to a file.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use provider_keys_encrypt_core::key_command::{KeyCommandError, MAX_OUTPUT_BYTES};
use zeroize::Zeroizing;

/// Run `command` and return what it printed, or why not.
pub fn run(command: &str, timeout: Duration) -> Result<Zeroizing<Vec<u8>>, KeyCommandError> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| KeyCommandError::Spawn(e.kind().to_string()))?;
    let deadline = Instant::now() + timeout;
    let timed_out = || KeyCommandError::TimedOut(timeout.as_millis() as u64);
    let read = read_until(&mut child, deadline);
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
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(KeyCommandError::Failed(e.kind().to_string())),
            }
        }
    });
    if outcome.is_err() {
        kill_group(&child);
        let _ = child.wait();
    }
    outcome.map_err(|e| match e {
        KeyCommandError::TimedOut(_) => timed_out(),
        e => e,
    })
}

/// Read the child's standard output until it ends, the deadline passes or it is too long.
fn read_until(child: &mut Child, deadline: Instant) -> Result<Zeroizing<Vec<u8>>, KeyCommandError> {
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut out = Zeroizing::new(Vec::with_capacity(4096));
    let mut buf = Zeroizing::new([0u8; 4096]);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(KeyCommandError::TimedOut(0));
        }
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
            continue; // the deadline is checked above
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
        for e in [
            run("echo sk-secret; exit 3", SHORT).err().unwrap(),
            run("echo sk-secret; exec sleep 30", SHORT).err().unwrap(),
        ] {
            assert!(!e.to_string().contains("sk-secret"), "{e}");
        }
    }
}
