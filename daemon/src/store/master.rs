//! Where the master key comes from.
//!
//! 1. systemd's credentials: with `LoadCredentialEncrypted=callbox-master-key:…` in the unit
//!    (sealed to the TPM and/or the host key by `systemd-creds encrypt`), systemd decrypts it
//!    into `$CREDENTIALS_DIRECTORY/callbox-master-key` for this service only.
//! 2. Otherwise `<state>/keys/master.key` (32 random bytes, 0600, in a 0700 folder), created
//!    on the first start — only when no store exists yet. A store without its key is an
//!    error that says so; it never gets a fresh key, which would orphan every stored call.
//!
//! Rotation (file keys only): `create_next` writes `keys/master.key.new`; `CallStore::open`
//! with both keys re-wraps every class key under the new one (crash-safe, resumed by the
//! next open whenever the new file is there); `promote_next` then renames it over
//! `master.key`. A stop at any step leaves a state the next start completes.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom;

use super::crypto::{MasterKey, KEY_BYTES};
use super::{MasterKeys, StoreError, KEYS_FILE, STORE_DIR};

pub const CREDENTIAL_NAME: &str = "callbox-master-key";
pub const KEY_FILE: &str = "keys/master.key";
/// The next master key while a rotation is under way.
pub const NEXT_KEY_FILE: &str = "keys/master.key.new";

/// Where the key was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Credential(PathBuf),
    File(PathBuf),
    Created(PathBuf),
}

/// The master key for the store under `state_dir` (and the next one, when a file-key
/// rotation is under way); `credentials_dir` is `$CREDENTIALS_DIRECTORY` when systemd set it.
pub fn load(state_dir: &Path, credentials_dir: Option<&Path>) -> Result<(MasterKeys, KeySource), StoreError> {
    if let Some(dir) = credentials_dir {
        let path = dir.join(CREDENTIAL_NAME);
        if path.exists() {
            return Ok((MasterKeys::only(read_key(&path)?), KeySource::Credential(path)));
        }
    }
    let path = state_dir.join(KEY_FILE);
    match std::fs::metadata(&path) {
        Ok(_) => {
            let next_path = state_dir.join(NEXT_KEY_FILE);
            let next = if next_path.exists() { Some(read_key(&next_path)?) } else { None };
            return Ok((MasterKeys { current: read_key(&path)?, next }, KeySource::File(path)));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::MasterKey(format!("{}: {e}", path.display()))),
    }
    if state_dir.join(STORE_DIR).join(KEYS_FILE).exists() {
        return Err(StoreError::MasterKey(format!(
            "{} is missing but a call store exists in {}: restore the key from its backup (or give it as the \
             systemd credential {CREDENTIAL_NAME}); a new key cannot open the stored calls",
            path.display(),
            state_dir.join(STORE_DIR).display()
        )));
    }
    create(&path).map(|key| (MasterKeys::only(key), KeySource::Created(path)))
}

/// Starts a rotation: a new random key in `keys/master.key.new` (or the one already there,
/// from a rotation that stopped half-way).
pub fn create_next(state_dir: &Path) -> Result<MasterKey, StoreError> {
    let path = state_dir.join(NEXT_KEY_FILE);
    if path.exists() {
        return read_key(&path);
    }
    create(&path)
}

/// Ends a rotation once the store runs on the next key: the new file replaces the old one
/// (an atomic rename, then the folder is synced so the rename survives a power cut).
pub fn promote_next(state_dir: &Path) -> Result<(), StoreError> {
    let (next, current) = (state_dir.join(NEXT_KEY_FILE), state_dir.join(KEY_FILE));
    let err = |e: std::io::Error| {
        StoreError::MasterKey(format!("cannot rename {} to {}: {e}", next.display(), current.display()))
    };
    std::fs::rename(&next, &current).map_err(err)?;
    if let Some(dir) = current.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}

fn read_key(path: &Path) -> Result<MasterKey, StoreError> {
    let bytes = std::fs::read(path).map_err(|e| StoreError::MasterKey(format!("{}: {e}", path.display())))?;
    let bytes: [u8; KEY_BYTES] = bytes.try_into().map_err(|b: Vec<u8>| {
        StoreError::MasterKey(format!(
            "{} has {} bytes, not {KEY_BYTES}: it is damaged or not a callbox master key",
            path.display(),
            b.len()
        ))
    })?;
    Ok(MasterKey::new(&bytes))
}

fn create(path: &Path) -> Result<MasterKey, StoreError> {
    let err = |e: std::io::Error| StoreError::MasterKey(format!("cannot create {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    }
    let mut bytes = [0u8; KEY_BYTES];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| StoreError::Random)?;
    // Written whole under a temporary name, then linked: a crash never leaves a short key,
    // and two starts racing cannot each write a different one (the link fails for the second).
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(err)?;
    file.write_all(&bytes).and_then(|()| file.sync_all()).map_err(err)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(MasterKey::new(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(path),
        Err(e) => Err(err(e)),
    }
}
