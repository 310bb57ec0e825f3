//! Reading files that come from outside (config, rules, sidecars, recordings, models)
//! without trusting them: one bounded reader used everywhere a file is read.
//!
//! A path may name `/dev/zero`, a FIFO with no writer or a file that grows while it is
//! read; `metadata().len()` says nothing true about any of them. So a file is opened
//! with `O_NONBLOCK` (a FIFO does not hang the open), must be a regular file by
//! `fstat` on the open descriptor (no race with a rename), and is read to at most
//! `limit + 1` bytes: one byte over the limit is proof enough that it is too large.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Whether the last path component may be a symbolic link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Operator-named files (config, rules, models): a link the operator made is fine.
    Follow,
    /// Files dropped by others (spool entries): a link could point anywhere.
    Refuse,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path} is a symbolic link; only regular files are read here")]
    Link { path: PathBuf },
    #[error("{path} is not a regular file ({kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than the limit of {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not UTF-8 text")]
    NotUtf8 { path: PathBuf },
}

impl ReadError {
    /// True when the file does not exist (callers with a default for that case).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Opens a regular file for reading, never blocking on a FIFO or device and, with
/// `Links::Refuse`, never following a link. Returns the file and its size at open.
pub fn open_regular(path: &Path, links: Links) -> Result<(File, u64), ReadError> {
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if links == Links::Refuse {
        flags |= libc::O_NOFOLLOW;
    }
    let file = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path).map_err(|source| {
        if links == Links::Refuse && source.raw_os_error() == Some(libc::ELOOP) {
            ReadError::Link { path: path.to_owned() }
        } else {
            ReadError::Open { path: path.to_owned(), source }
        }
    })?;
    let meta = file.metadata().map_err(|source| ReadError::Read { path: path.to_owned(), source })?;
    let kind = file_kind(&meta.file_type());
    if kind != "regular file" {
        return Err(ReadError::NotRegular { path: path.to_owned(), kind });
    }
    Ok((file, meta.len()))
}

/// A name for a file type, for messages.
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "unknown type"
    }
}

/// Reads a whole regular file of at most `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64, links: Links) -> Result<Vec<u8>, ReadError> {
    let (file, size) = open_regular(path, links)?;
    if size > limit {
        return Err(ReadError::TooLarge { path: path.to_owned(), limit });
    }
    let mut bytes = Vec::with_capacity(size.min(limit) as usize);
    // limit + 1: a file that grew past the limit since fstat is caught here.
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| ReadError::Read { path: path.to_owned(), source })?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { path: path.to_owned(), limit });
    }
    Ok(bytes)
}

/// Reads a whole regular UTF-8 text file of at most `limit` bytes.
pub fn read_text_bounded(path: &Path, limit: u64, links: Links) -> Result<String, ReadError> {
    String::from_utf8(read_bounded(path, limit, links)?).map_err(|_| ReadError::NotUtf8 { path: path.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_and_directories_are_refused_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Would hang (FIFO) or exhaust memory (/dev/zero) with std::fs::read.
        for (path, kind) in [(Path::new("/dev/zero"), "character device"), (&fifo, "FIFO"), (dir.path(), "directory")] {
            match read_bounded(path, 1024, Links::Follow) {
                Err(ReadError::NotRegular { kind: k, .. }) => assert_eq!(k, kind),
                other => panic!("{}: {other:?}", path.display()),
            }
        }
    }

    #[test]
    fn links_are_refused_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.json");
        std::fs::write(&target, "{}").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read_bounded(&link, 10, Links::Follow).unwrap(), b"{}");
        assert!(matches!(read_bounded(&link, 10, Links::Refuse), Err(ReadError::Link { .. })));
        let to_zero = dir.path().join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &to_zero).unwrap();
        assert!(matches!(read_bounded(&to_zero, 10, Links::Follow), Err(ReadError::NotRegular { .. })));
    }

    #[test]
    fn the_limit_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, [7u8; 100]).unwrap();
        assert_eq!(read_bounded(&file, 100, Links::Refuse).unwrap().len(), 100);
        assert!(matches!(read_bounded(&file, 99, Links::Refuse), Err(ReadError::TooLarge { limit: 99, .. })));
        assert!(read_bounded(&dir.path().join("missing"), 9, Links::Refuse).unwrap_err().is_not_found());
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_text_bounded(&file, 9, Links::Refuse), Err(ReadError::NotUtf8 { .. })));
    }
}
