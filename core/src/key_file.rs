//! `<VAR>_FILE`: a key variable's value read from a file, the convention of the official
//! PostgreSQL image (`POSTGRES_PASSWORD_FILE`) for Docker and Kubernetes secrets.
//!
//! For each key variable (`ENCRYPTION_KEY`, `ENCRYPTION_KEY_PREVIOUS`,
//! `GATEWAY_API_KEY_HASH_SECRET`) the server's environment may hold the value itself, or
//! `<VAR>_FILE` naming a file that holds it, not both. The file must be a regular file that the
//! server can read and that other users (the "others" permission bits) can neither read nor
//! write: a key readable by every account on the host is refused, as PostgreSQL refuses an
//! `ssl_key_file` with such permissions. Trailing line ends (`\n`, `\r`) are dropped, as the
//! shell's `$(< file)` in the official image's `file_env` drops them; everything else is the
//! value, decoded exactly as the variable itself would be ([`crate::keys::env_text`]).
//!
//! Errors name the variable, the path and the cause; never a byte of the file.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// The largest key file read (a keyring of a few dozen secrets is a few KiB).
pub const MAX_FILE_BYTES: u64 = 64 * 1024;

/// Where a key variable's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// the variable itself
    Environment,
    /// the file `<VAR>_FILE` names
    File(PathBuf),
}

/// Why a `<VAR>_FILE` was refused. Never holds the file's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("both {var} and {var}_FILE are set in the server's environment; set only one")]
    BothSet { var: &'static str },
    #[error("{var}_FILE names {path}, which does not exist")]
    Missing { var: &'static str, path: PathBuf },
    #[error("{var}_FILE names {path}, which the server cannot read: {reason}")]
    Unreadable {
        var: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{var}_FILE names {path}, which other users can access (mode {mode:04o}); a key file \
         must not be readable or writable by others"
    )]
    OthersCanAccess {
        var: &'static str,
        path: PathBuf,
        mode: u32,
    },
}

impl KeyFileError {
    /// The variable whose file was refused.
    pub fn var(&self) -> &'static str {
        match self {
            KeyFileError::BothSet { var }
            | KeyFileError::Missing { var, .. }
            | KeyFileError::Unreadable { var, .. }
            | KeyFileError::OthersCanAccess { var, .. } => var,
        }
    }
}

/// The value of key variable `var` as raw bytes, from the environment `lookup` describes:
/// `var` itself, or the file `<var>_FILE` names (see the module doc). `Ok(None)`: neither set.
/// An empty `<var>_FILE` counts as unset, like an empty variable.
pub fn read_var(
    var: &'static str,
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<Option<(Zeroizing<Vec<u8>>, Origin)>, KeyFileError> {
    let direct = lookup(var);
    let file = lookup(&format!("{var}_FILE")).filter(|p| !p.is_empty());
    match (direct, file) {
        (Some(_), Some(_)) => Err(KeyFileError::BothSet { var }),
        (Some(v), None) => Ok(Some((
            Zeroizing::new(v.as_bytes().to_vec()),
            Origin::Environment,
        ))),
        (None, Some(path)) => {
            let path = PathBuf::from(path);
            let bytes = read_key_file(var, &path)?;
            Ok(Some((bytes, Origin::File(path))))
        }
        (None, None) => Ok(None),
    }
}

/// Read a key file after checking what it is and who can access it. The checks are made on
/// the opened file (`fstat`), so they hold for the bytes read. Opened non-blocking: a FIFO (or
/// a device) is refused as not a regular file instead of blocking the server's start.
fn read_key_file(var: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let unreadable = |reason: String| KeyFileError::Unreadable {
        var,
        path: path.to_owned(),
        reason,
    };
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KeyFileError::Missing {
                var,
                path: path.to_owned(),
            },
            std::io::ErrorKind::PermissionDenied => unreadable("permission denied".into()),
            _ => unreadable(io_reason(&e)),
        })?;
    let meta = file.metadata().map_err(|e| unreadable(io_reason(&e)))?;
    if !meta.is_file() {
        return Err(unreadable("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(KeyFileError::OthersCanAccess {
            var,
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(unreadable(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    (&mut file)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(io_reason(&e)))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(unreadable(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    Ok(bytes)
}

/// An I/O error's description without the OS's "(os error N)" noise.
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_lowercase(),
        None => s.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::fs;

    const VAR: &str = "ENCRYPTION_KEY";

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pke-key-file-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn file(d: &Path, content: &[u8], mode: u32) -> PathBuf {
        let p = d.join("key");
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn env(pairs: &[(&str, &OsString)]) -> impl Fn(&str) -> Option<OsString> {
        let m: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).clone()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn value(r: Result<Option<(Zeroizing<Vec<u8>>, Origin)>, KeyFileError>) -> (Vec<u8>, Origin) {
        let (b, o) = r.unwrap().unwrap();
        (b.to_vec(), o)
    }

    #[test]
    fn neither_set_is_none() {
        assert_eq!(read_var(VAR, env(&[])).unwrap(), None);
        let empty = OsString::new();
        assert_eq!(
            read_var(VAR, env(&[("ENCRYPTION_KEY_FILE", &empty)])).unwrap(),
            None
        );
    }

    #[test]
    fn the_variable_itself() {
        let v = OsString::from("abc=");
        assert_eq!(
            value(read_var(VAR, env(&[(VAR, &v)]))),
            (b"abc=".to_vec(), Origin::Environment)
        );
    }

    #[test]
    fn a_file_gives_its_content_without_trailing_line_ends() {
        let d = dir("content");
        for (content, want) in [
            (&b"k1\n"[..], &b"k1"[..]),
            (b"k1\r\n\n", b"k1"),
            (b"k1", b"k1"),
            (b" a, b \n", b" a, b "),
            (b"\n", b""),
            (b"x\ny\n", b"x\ny"),
        ] {
            let p = file(&d, content, 0o600);
            let po = p.clone().into_os_string();
            assert_eq!(
                value(read_var(VAR, env(&[("ENCRYPTION_KEY_FILE", &po)]))),
                (want.to_vec(), Origin::File(p))
            );
        }
        // group-readable is fine (root:postgres 0640 is the usual secret file)
        let p = file(&d, b"k2\n", 0o640).into_os_string();
        assert_eq!(
            value(read_var(VAR, env(&[("ENCRYPTION_KEY_FILE", &p)]))).0,
            b"k2"
        );
    }

    #[test]
    fn both_set_is_refused() {
        let d = dir("both");
        let p = file(&d, b"k", 0o600).into_os_string();
        let v = OsString::from("k");
        let e = read_var(VAR, env(&[(VAR, &v), ("ENCRYPTION_KEY_FILE", &p)])).unwrap_err();
        assert_eq!(e, KeyFileError::BothSet { var: VAR });
        assert_eq!(e.var(), VAR);
    }

    #[test]
    fn a_missing_file_is_refused() {
        let d = dir("missing");
        let p = d.join("nope");
        let po = p.clone().into_os_string();
        let e = read_var(VAR, env(&[("ENCRYPTION_KEY_FILE", &po)])).unwrap_err();
        assert_eq!(e, KeyFileError::Missing { var: VAR, path: p });
    }

    #[test]
    fn a_file_others_can_access_is_refused_and_its_content_not_shown() {
        let d = dir("others");
        for mode in [0o644, 0o604, 0o602, 0o601, 0o666] {
            let p = file(&d, b"secret-key-material\n", mode);
            let po = p.clone().into_os_string();
            let e = read_var(VAR, env(&[("ENCRYPTION_KEY_FILE", &po)])).unwrap_err();
            assert_eq!(
                e,
                KeyFileError::OthersCanAccess {
                    var: VAR,
                    path: p,
                    mode
                }
            );
            let text = e.to_string();
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains(&format!("mode {mode:04o}")), "{text}");
        }
    }

    #[test]
    fn not_a_regular_file_or_too_large_is_unreadable() {
        let d = dir("kind");
        let po = d.clone().into_os_string();
        let e = read_var(VAR, env(&[("ENCRYPTION_KEY_FILE", &po)])).unwrap_err();
        assert!(matches!(e, KeyFileError::Unreadable { .. }), "{e:?}");
        let big = vec![b'a'; MAX_FILE_BYTES as usize + 1];
        let po = file(&d.join(""), &big, 0o600).into_os_string();
        let e = read_var(VAR, env(&[("ENCRYPTION_KEY_FILE", &po)])).unwrap_err();
        assert!(e.to_string().contains("larger than 65536 bytes"), "{e}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = dir("fifo");
        let p = d.join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(status.success());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let po = p.into_os_string();
        let e = read_var(VAR, env(&[("ENCRYPTION_KEY_FILE", &po)])).unwrap_err();
        assert!(
            e.to_string().ends_with("cannot read: not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn a_file_the_process_may_not_open_is_unreadable() {
        // root opens any file, so this can only be seen as another user
        if unsafe_is_root() {
            return;
        }
        let d = dir("perm");
        let p = file(&d, b"k", 0o000).into_os_string();
        let e = read_var(VAR, env(&[("ENCRYPTION_KEY_FILE", &p)])).unwrap_err();
        assert!(
            e.to_string().ends_with("cannot read: permission denied"),
            "{e}"
        );
    }

    fn unsafe_is_root() -> bool {
        fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }
}
