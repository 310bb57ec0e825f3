//! TLS for MQTT: the CA that signs the broker, the box's client certificate and key (PEM),
//! rustls over ring (no C build, the crypto the store already uses).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::UplinkError;
use crate::config::HqConfig;
use crate::fsio::{read_bounded, Links};

/// PEM files are a few kB; a CA bundle a few hundred.
const MAX_PEM_BYTES: u64 = 1 << 20;

fn read(key: &str, path: Option<&Path>) -> Result<(Vec<u8>, std::path::PathBuf), UplinkError> {
    let path = path.ok_or_else(|| UplinkError::Config(format!("{key} is not set")))?;
    let bytes =
        read_bounded(path, MAX_PEM_BYTES, Links::Follow).map_err(|e| UplinkError::Tls(format!("{key}: {e}")))?;
    Ok((bytes, path.to_owned()))
}

fn certificates(key: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, UplinkError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| UplinkError::Tls(format!("{key} {}: not PEM certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(UplinkError::Tls(format!("{key} {}: no certificate in it", path.display())));
    }
    Ok(certs)
}

/// The rustls client configuration from `[hq]`: refuses a key file others can read.
pub fn client_config(cfg: &HqConfig) -> Result<Arc<rustls::ClientConfig>, UplinkError> {
    let (ca_pem, ca_path) = read("hq.ca_file", cfg.ca_file.as_deref())?;
    let (cert_pem, cert_path) = read("hq.cert_file", cfg.cert_file.as_deref())?;
    let key_path = cfg.key_file.as_deref().ok_or_else(|| UplinkError::Config("hq.key_file is not set".into()))?;
    let mode = std::fs::metadata(key_path)
        .map_err(|e| UplinkError::Tls(format!("hq.key_file {}: {e}", key_path.display())))?
        .mode();
    if mode & 0o007 != 0 {
        return Err(UplinkError::Tls(format!(
            "hq.key_file {} is readable by everyone (mode {:o}): chmod 0600 it (or 0640 with the callbox group)",
            key_path.display(),
            mode & 0o777
        )));
    }
    let (key_pem, _) = read("hq.key_file", Some(key_path))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates("hq.ca_file", &ca_path, &ca_pem)? {
        roots.add(cert).map_err(|e| UplinkError::Tls(format!("hq.ca_file {}: {e}", ca_path.display())))?;
    }
    let chain = certificates("hq.cert_file", &cert_path, &cert_pem)?;
    // The key's bytes never reach an error message or the log.
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| UplinkError::Tls(format!("hq.key_file {}: no PEM private key in it", key_path.display())))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| UplinkError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| UplinkError::Tls(format!("hq.cert_file and hq.key_file do not make a client identity: {e}")))?;
    Ok(Arc::new(config))
}
