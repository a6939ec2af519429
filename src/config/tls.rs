//! The TLS files of `rediss://` connections: a CA to trust, a client certificate and its key.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::parse::config_error;
use super::redact::{redact_url, shown_url};
use super::RedisConfig;
use crate::error::{Error, Result};

impl RedisConfig {
    /// True when a CA file or a client certificate or key is configured.
    fn has_tls_files(&self) -> bool {
        self.tls_ca_cert.is_some()
            || self.tls_client_cert.is_some()
            || self.tls_client_key.is_some()
    }

    /// Checks the TLS settings: `rediss://` URLs when TLS files are set, both halves of a
    /// client identity, and files that can be read and parsed.
    pub(super) fn check_tls(&self) -> Result<()> {
        // The redis crate reaches the master found through Sentinel without TLS whatever the
        // sentinels' scheme: a rediss:// Sentinel URL would promise encryption and send the
        // password and the data in clear text.
        if let Some(u) = self.sentinel_urls.iter().find(|u| is_tls_url(u)) {
            return Err(config_error(
                "REDIS_SENTINEL_URLS",
                &redact_url(u),
                "redis:// Sentinel URLs: TLS through Sentinel is not supported (the connection \
                 to the master would not be encrypted)",
            ));
        }
        if !self.has_tls_files() {
            return Ok(());
        }
        if !self.sentinel_urls.is_empty() {
            return Err(config_error(
                "REDIS_SENTINEL_URLS",
                &redact_url(&self.sentinel_urls.join(",")),
                "no Sentinel when REDIS_TLS_CA_CERT, REDIS_TLS_CLIENT_CERT or \
                 REDIS_TLS_CLIENT_KEY is set: TLS through Sentinel is not supported",
            ));
        }
        if let Some(u) = self.urls().into_iter().find(|u| !is_tls_url(u)) {
            return Err(config_error(
                "REDIS_URL",
                &shown_url(&self.url, u),
                "rediss:// URLs when REDIS_TLS_CA_CERT, REDIS_TLS_CLIENT_CERT or \
                 REDIS_TLS_CLIENT_KEY is set (a redis:// URL would send the data and the \
                 password in clear text)",
            ));
        }
        self.tls_certificates().map(|_| ())
    }

    /// The TLS files' contents as the `redis` crate takes them; `None` when no file is set
    /// (a `rediss://` URL then trusts the system's roots).
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable and the file: unreadable, not PEM, no certificate
    /// or key in it, or a client certificate without its key (or the reverse).
    pub(crate) fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>> {
        if !self.has_tls_files() {
            return Ok(None);
        }
        let root_cert = match &self.tls_ca_cert {
            None => None,
            Some(path) => {
                let pem = read_tls_file("REDIS_TLS_CA_CERT", path, "CA certificates")?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in parse_certificates("REDIS_TLS_CA_CERT", path, &pem)? {
                    roots.add(cert).map_err(|e| {
                        tls_file_error(
                            "REDIS_TLS_CA_CERT",
                            path,
                            &format!("a usable CA certificate in it ({e})"),
                        )
                    })?;
                }
                Some(pem)
            }
        };
        let client_tls = match (&self.tls_client_cert, &self.tls_client_key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(config_error(
                    "REDIS_TLS_CLIENT_KEY",
                    "",
                    "the private key of REDIS_TLS_CLIENT_CERT (mutual TLS needs both)",
                ))
            }
            (None, Some(_)) => {
                return Err(config_error(
                    "REDIS_TLS_CLIENT_CERT",
                    "",
                    "the certificate of REDIS_TLS_CLIENT_KEY (mutual TLS needs both)",
                ))
            }
            (Some(cert_path), Some(key_path)) => {
                let client_cert =
                    read_tls_file("REDIS_TLS_CLIENT_CERT", cert_path, "a client certificate")?;
                parse_certificates("REDIS_TLS_CLIENT_CERT", cert_path, &client_cert)?;
                let client_key = read_tls_file("REDIS_TLS_CLIENT_KEY", key_path, "a private key")?;
                // The parser's message is left out: it may quote a line of the key file.
                PrivateKeyDer::from_pem_slice(&client_key).map_err(|_| {
                    tls_file_error(
                        "REDIS_TLS_CLIENT_KEY",
                        key_path,
                        "a PEM private key (PKCS#8, PKCS#1 or SEC1) in it; none found",
                    )
                })?;
                Some(redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

/// True for a URL with a TLS scheme (`rediss://`, or Valkey's `valkeys://`).
pub(super) fn is_tls_url(url: &str) -> bool {
    let u = url.trim_start().to_ascii_lowercase();
    u.starts_with("rediss://") || u.starts_with("valkeys://")
}

fn tls_file_error(variable: &str, path: &Path, expected: &str) -> Error {
    Error::Config {
        variable: variable.to_string(),
        value: path.display().to_string(),
        expected: expected.to_string(),
    }
}

fn read_tls_file(variable: &str, path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        tls_file_error(
            variable,
            path,
            &format!("a readable PEM file of {what} (cannot read it: {e})"),
        )
    })
}

/// The certificates of a PEM file: at least one.
fn parse_certificates(
    variable: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_file_error(variable, path, &format!("a valid PEM file ({e})")))?;
    if certs.is_empty() {
        return Err(tls_file_error(
            variable,
            path,
            "a PEM file with at least one CERTIFICATE block; none found",
        ));
    }
    Ok(certs)
}
