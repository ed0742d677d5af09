//! `<VAR>_FILE`: a key variable's value read from a file, the convention of the official
//! PostgreSQL image (`POSTGRES_PASSWORD_FILE`) for Docker and Kubernetes secrets.
//!
//! For each key variable (`ENCRYPTION_KEY`, `ENCRYPTION_KEY_PREVIOUS`,
//! `GATEWAY_API_KEY_HASH_SECRET`) the server's environment may hold the value itself, or
//! `<VAR>_FILE` naming a file that holds it, not both. The file must be named by an absolute
//! path and be a regular file that the server can read, owned by the server's user or root,
//! that no other user can read or write and its group cannot write (mode 0600, 0400, 0640 or
//! 0440): the rule PostgreSQL applies to `ssl_key_file`, with group read allowed for either
//! owner (a Kubernetes secret volume with `fsGroup`). Trailing line ends (`\n`, `\r`) are
//! dropped, as the shell's `$(< file)` in the official image's `file_env` drops them; what is
//! left must not be empty, and is decoded exactly as the variable itself would be
//! ([`crate::keys::env_text`]).
//!
//! Errors name the variable, the path (control characters and bytes that are not UTF-8
//! escaped, so a path cannot forge a log line) and the cause; never a byte of the file.

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

/// A key variable's raw value and where it came from; `None` when neither `<VAR>` nor
/// `<VAR>_FILE` is set.
pub type KeyValue = Option<(Zeroizing<Vec<u8>>, Origin)>;

/// Why a `<VAR>_FILE` was refused. Never holds the file's content; `path` is [`shown`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("both {var} and {var}_FILE are set in the server's environment; set only one")]
    BothSet { var: &'static str },
    #[error("{var}_FILE names {path}, which is not an absolute path")]
    NotAbsolute { var: &'static str, path: String },
    #[error("{var}_FILE names {path}, which does not exist")]
    Missing { var: &'static str, path: String },
    #[error("{var}_FILE names {path}, which the server cannot read: {reason}")]
    Unreadable {
        var: &'static str,
        path: String,
        reason: String,
    },
    #[error(
        "{var}_FILE names {path}, which other users can access (mode {mode:04o}); a key file \
         may be read by its owner and group only, and written by its owner only"
    )]
    OthersCanAccess {
        var: &'static str,
        path: String,
        mode: u32,
    },
    #[error(
        "{var}_FILE names {path}, which is owned by uid {uid}; a key file must be owned by the \
         server's user or root"
    )]
    WrongOwner {
        var: &'static str,
        path: String,
        uid: u32,
    },
    #[error("{var}_FILE names {path}, which holds no value")]
    Empty { var: &'static str, path: String },
}

impl KeyFileError {
    /// The variable whose file was refused.
    pub fn var(&self) -> &'static str {
        match self {
            KeyFileError::BothSet { var }
            | KeyFileError::NotAbsolute { var, .. }
            | KeyFileError::Missing { var, .. }
            | KeyFileError::Unreadable { var, .. }
            | KeyFileError::OthersCanAccess { var, .. }
            | KeyFileError::WrongOwner { var, .. }
            | KeyFileError::Empty { var, .. } => var,
        }
    }
}

/// A path as messages show it: UTF-8 text as is, but control characters escaped (`\n`,
/// `\u{1b}`) and each byte that is not UTF-8 as `\xNN`, so what is shown is unambiguous and a
/// path cannot start a new log line.
pub fn shown(path: &Path) -> String {
    let mut out = String::new();
    for chunk in path.as_os_str().as_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The value of key variable `var` as raw bytes, from the environment `lookup` describes:
/// `var` itself, or the file `<var>_FILE` names (see the module doc), which must be owned by
/// `server_uid` (the server's effective uid) or root. `Ok(None)`: neither set. An empty
/// `<var>_FILE` variable counts as unset, like an empty variable; an empty file is refused.
pub fn read_var(
    var: &'static str,
    lookup: impl Fn(&str) -> Option<OsString>,
    server_uid: u32,
) -> Result<KeyValue, KeyFileError> {
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
            let bytes = read_key_file(var, &path, server_uid)?;
            Ok(Some((bytes, Origin::File(path))))
        }
        (None, None) => Ok(None),
    }
}

/// Read a key file after checking what it is and who can access it. The checks are made on
/// the opened file (`fstat`), so they hold for the bytes read. Opened non-blocking: a FIFO (or
/// a device) is refused as not a regular file instead of blocking the server's start.
fn read_key_file(
    var: &'static str,
    path: &Path,
    server_uid: u32,
) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    use std::os::unix::fs::MetadataExt;
    let unreadable = |reason: String| KeyFileError::Unreadable {
        var,
        path: shown(path),
        reason,
    };
    if !path.is_absolute() {
        // a relative path would be resolved in the data directory: never what was meant
        return Err(KeyFileError::NotAbsolute {
            var,
            path: shown(path),
        });
    }
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KeyFileError::Missing {
                var,
                path: shown(path),
            },
            std::io::ErrorKind::PermissionDenied => unreadable("permission denied".into()),
            _ => unreadable(io_reason(&e)),
        })?;
    let meta = file.metadata().map_err(|e| unreadable(io_reason(&e)))?;
    if !meta.is_file() {
        return Err(unreadable("not a regular file".into()));
    }
    if meta.uid() != server_uid && meta.uid() != 0 {
        return Err(KeyFileError::WrongOwner {
            var,
            path: shown(path),
            uid: meta.uid(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o027 != 0 {
        return Err(KeyFileError::OthersCanAccess {
            var,
            path: shown(path),
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
    if bytes.is_empty() {
        // an empty secret is a mistake (a failed write, a wrong file), not "no key"
        return Err(KeyFileError::Empty {
            var,
            path: shown(path),
        });
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
    const FILE_VAR: &str = "ENCRYPTION_KEY_FILE";

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

    /// This process's effective uid (the owner of the files it writes).
    fn me() -> u32 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        uid.split_whitespace().nth(2).unwrap().parse().unwrap()
    }

    fn env(pairs: &[(&str, &OsString)]) -> impl Fn(&str) -> Option<OsString> {
        let m: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).clone()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn read(pairs: &[(&str, &OsString)]) -> Result<KeyValue, KeyFileError> {
        read_var(VAR, env(pairs), me())
    }

    fn value(r: Result<KeyValue, KeyFileError>) -> (Vec<u8>, Origin) {
        let (b, o) = r.unwrap().unwrap();
        (b.to_vec(), o)
    }

    #[test]
    fn neither_set_is_none() {
        assert_eq!(read(&[]).unwrap(), None);
        let empty = OsString::new();
        assert_eq!(read(&[(FILE_VAR, &empty)]).unwrap(), None);
    }

    #[test]
    fn the_variable_itself() {
        let v = OsString::from("abc=");
        assert_eq!(
            value(read(&[(VAR, &v)])),
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
            (b"x\ny\n", b"x\ny"),
        ] {
            let p = file(&d, content, 0o600);
            let po = p.clone().into_os_string();
            assert_eq!(
                value(read(&[(FILE_VAR, &po)])),
                (want.to_vec(), Origin::File(p))
            );
        }
        // group read is fine (root:postgres 0640, a Kubernetes secret with fsGroup 0440)
        for mode in [0o640, 0o440, 0o400] {
            let p = file(&d, b"k2\n", mode).into_os_string();
            assert_eq!(value(read(&[(FILE_VAR, &p)])).0, b"k2");
        }
    }

    #[test]
    fn an_empty_file_is_refused() {
        let d = dir("empty");
        for content in [&b""[..], b"\n", b"\r\n\n"] {
            let p = file(&d, content, 0o600);
            let po = p.clone().into_os_string();
            assert_eq!(
                read(&[(FILE_VAR, &po)]).unwrap_err(),
                KeyFileError::Empty {
                    var: VAR,
                    path: shown(&p)
                }
            );
        }
    }

    #[test]
    fn both_set_is_refused() {
        let d = dir("both");
        let p = file(&d, b"k", 0o600).into_os_string();
        for v in [OsString::from("k"), OsString::new()] {
            let e = read(&[(VAR, &v), (FILE_VAR, &p)]).unwrap_err();
            assert_eq!(e, KeyFileError::BothSet { var: VAR });
            assert_eq!(e.var(), VAR);
        }
    }

    #[test]
    fn a_relative_path_is_refused() {
        let po = OsString::from("postgresql.conf");
        assert_eq!(
            read(&[(FILE_VAR, &po)]).unwrap_err(),
            KeyFileError::NotAbsolute {
                var: VAR,
                path: "postgresql.conf".into()
            }
        );
    }

    #[test]
    fn a_missing_file_is_refused() {
        let d = dir("missing");
        let p = d.join("nope");
        let po = p.clone().into_os_string();
        let e = read(&[(FILE_VAR, &po)]).unwrap_err();
        assert_eq!(
            e,
            KeyFileError::Missing {
                var: VAR,
                path: shown(&p)
            }
        );
    }

    #[test]
    fn a_file_others_can_access_or_its_group_write_is_refused_and_its_content_not_shown() {
        let d = dir("others");
        for mode in [0o644, 0o604, 0o602, 0o601, 0o666, 0o660, 0o620, 0o664] {
            let p = file(&d, b"secret-key-material\n", mode);
            let po = p.clone().into_os_string();
            let e = read(&[(FILE_VAR, &po)]).unwrap_err();
            assert_eq!(
                e,
                KeyFileError::OthersCanAccess {
                    var: VAR,
                    path: shown(&p),
                    mode
                }
            );
            let text = e.to_string();
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains(&format!("mode {mode:04o}")), "{text}");
        }
    }

    #[test]
    fn a_file_owned_by_another_user_is_refused() {
        let d = dir("owner");
        let p = file(&d, b"k\n", 0o600);
        let po = p.clone().into_os_string();
        let owner = me();
        // as seen by a server running as another uid: neither its user nor root
        let server = owner.wrapping_add(4242);
        if owner != 0 {
            assert_eq!(
                read_var(VAR, env(&[(FILE_VAR, &po)]), server).unwrap_err(),
                KeyFileError::WrongOwner {
                    var: VAR,
                    path: shown(&p),
                    uid: owner
                }
            );
        } else {
            // a root-owned file is accepted whatever the server's user
            assert!(read_var(VAR, env(&[(FILE_VAR, &po)]), server).is_ok());
        }
    }

    #[test]
    fn not_a_regular_file_or_too_large_is_unreadable() {
        let d = dir("kind");
        let po = d.clone().into_os_string();
        let e = read(&[(FILE_VAR, &po)]).unwrap_err();
        assert!(matches!(e, KeyFileError::Unreadable { .. }), "{e:?}");
        let big = vec![b'a'; MAX_FILE_BYTES as usize + 1];
        let po = file(&d, &big, 0o600).into_os_string();
        let e = read(&[(FILE_VAR, &po)]).unwrap_err();
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
        let e = read(&[(FILE_VAR, &po)]).unwrap_err();
        assert!(
            e.to_string().ends_with("cannot read: not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn a_path_is_shown_escaped() {
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(std::ffi::OsStr::from_bytes(
            b"/run/a\nLOG:  forged\x1b\xff\\b",
        ));
        assert_eq!(shown(p), "/run/a\\nLOG:  forged\\u{1b}\\xff\\\\b");
        assert_eq!(
            shown(Path::new("/run/secrets/encryption_key")),
            "/run/secrets/encryption_key"
        );
        let e = KeyFileError::Missing {
            var: VAR,
            path: shown(p),
        };
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn a_file_the_process_may_not_open_is_unreadable() {
        // root opens any file, so this can only be seen as another user
        if me() == 0 {
            return;
        }
        let d = dir("perm");
        let p = file(&d, b"k", 0o000).into_os_string();
        let e = read(&[(FILE_VAR, &p)]).unwrap_err();
        assert!(
            e.to_string().ends_with("cannot read: permission denied"),
            "{e}"
        );
    }
}
