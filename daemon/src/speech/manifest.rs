//! The model manifest written by `models/build.sh`: which files make up each model, their
//! sha256, and the facts the runtime relies on. The daemon refuses files whose digest does
//! not match, so a truncated copy or a swapped file never reaches inference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::SpeechError;

pub const MANIFEST_FILE: &str = "manifest.json";
const SUPPORTED_VERSION: u32 = 1;
/// Bounds what reading a manifest can cost; real ones are a few KiB.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Bounds what loading one model file can cost (Whisper base's decoder is ~200 MB).
const MAX_MODEL_FILE_BYTES: u64 = 2 << 30;

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub models: Vec<ModelEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    pub family: String,
    pub task: String,
    pub files: BTreeMap<String, FileEntry>,
    pub sample_rate: u32,
    #[serde(default)]
    pub languages: Vec<String>,
    pub license: String,
    pub source: Vec<String>,
    /// Family-specific facts (e.g. Whisper's decoder context), read by that family's loader.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl ModelEntry {
    pub fn extra_u64(&self, key: &str) -> Result<u64, SpeechError> {
        self.extra.get(key).and_then(serde_json::Value::as_u64).ok_or_else(|| {
            SpeechError::model(
                &self.name,
                format!("its {MANIFEST_FILE} entry lacks the integer `{key}`; rebuild with models/build.sh --force"),
            )
        })
    }
}

/// A manifest read from a models folder, with file paths resolved against it.
#[derive(Debug, Clone)]
pub struct ModelSet {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// A digest of the manifest (12 hex digits), which names every file's sha256: the
    /// models' version as HQ sees it.
    pub version: String,
}

impl Manifest {
    /// Parses and checks a manifest's text: the version this callbox reads, and no file
    /// path that leaves the models folder.
    pub fn parse(text: &str) -> Result<Self, String> {
        let manifest: Manifest = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if manifest.version != SUPPORTED_VERSION {
            return Err(format!("version {}, this callbox reads version {SUPPORTED_VERSION}", manifest.version));
        }
        for model in &manifest.models {
            for file in model.files.values() {
                let rel = Path::new(&file.path);
                if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                    return Err(format!("model {}: file path {} leaves the models folder", model.name, file.path));
                }
            }
        }
        Ok(manifest)
    }
}

impl ModelSet {
    pub fn open(dir: &Path) -> Result<Self, SpeechError> {
        let path = dir.join(MANIFEST_FILE);
        let text = read_model_file(&path, MAX_MANIFEST_BYTES)?;
        let text = String::from_utf8(text)
            .map_err(|_| SpeechError::Manifest { path: path.clone(), reason: "not UTF-8 text".into() })?;
        let manifest = Manifest::parse(&text).map_err(|reason| SpeechError::Manifest { path, reason })?;
        let version = crate::hex::encode(&ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref()[..6]);
        Ok(Self { dir: dir.to_path_buf(), manifest, version })
    }

    /// The first model for a task ("vad", "asr").
    pub fn for_task(&self, task: &str) -> Result<&ModelEntry, SpeechError> {
        self.manifest.models.iter().find(|m| m.task == task).ok_or_else(|| SpeechError::Manifest {
            path: self.dir.join(MANIFEST_FILE),
            reason: format!("no model for task `{task}`"),
        })
    }

    /// Checks every file of every model against its digest; returns (files, bytes).
    pub fn verify_all(&self) -> Result<(usize, u64), SpeechError> {
        let (mut files, mut bytes) = (0, 0);
        for model in &self.manifest.models {
            for role in model.files.keys() {
                bytes += self.read_verified(model, role)?.len() as u64;
                files += 1;
            }
        }
        Ok((files, bytes))
    }

    /// Reads one of a model's files after checking its sha256 against the manifest.
    pub fn read_verified(&self, model: &ModelEntry, role: &str) -> Result<Vec<u8>, SpeechError> {
        let entry = model.files.get(role).ok_or_else(|| SpeechError::Manifest {
            path: self.dir.join(MANIFEST_FILE),
            reason: format!("model {}: no `{role}` file", model.name),
        })?;
        let path = self.dir.join(&entry.path);
        let bytes = read_model_file(&path, MAX_MODEL_FILE_BYTES)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let actual = crate::hex::encode(digest.as_ref());
        if actual != entry.sha256.to_ascii_lowercase() {
            return Err(SpeechError::Digest { path, expected: entry.sha256.clone(), actual });
        }
        Ok(bytes)
    }
}

/// A models-folder file through the bounded reader: a link to /dev/zero or a FIFO is an
/// error, never a hang or a runaway allocation.
fn read_model_file(path: &Path, limit: u64) -> Result<Vec<u8>, SpeechError> {
    use crate::fsio::ReadError;
    crate::fsio::read_bounded(path, limit, crate::fsio::Links::Follow).map_err(|e| match e {
        ReadError::Open { source, .. } | ReadError::Read { source, .. } => {
            SpeechError::Io { path: path.to_owned(), source }
        }
        other => SpeechError::Manifest { path: path.to_owned(), reason: other.to_string() },
    })
}
