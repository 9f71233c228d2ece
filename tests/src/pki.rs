//! A certificate authority made for one test (rcgen), the certificates it signs, and their PEM
//! files in a temporary directory, as operators would hand them to legate and etcd.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use legate_proto::transport::TlsArgs;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, date_time_ymd,
};
use tempfile::TempDir;
use tokio_rustls::rustls;

/// A CA and the directory its files go to.
pub struct Pki {
    ca: Certificate,
    key: KeyPair,
    dir: TempDir,
}

/// The files of one certificate: chain, key, and the CA that signed it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    /// As legate's `--grpc-ca`, `--grpc-cert` and `--grpc-key`.
    pub fn tls(&self) -> TlsArgs {
        TlsArgs {
            ca: Some(self.ca.clone()),
            cert: Some(self.cert.clone()),
            key: Some(self.key.clone()),
        }
    }

    /// As legate's `--grpc-ca`, `--grpc-cert`, `--grpc-key` flags.
    pub fn grpc_flags(&self) -> Vec<String> {
        self.flags(["--grpc-ca", "--grpc-cert", "--grpc-key"])
    }

    /// As legate's `--etcd-cacert`, `--etcd-cert`, `--etcd-key` flags.
    pub fn etcd_flags(&self) -> Vec<String> {
        self.flags(["--etcd-cacert", "--etcd-cert", "--etcd-key"])
    }

    fn flags(&self, names: [&str; 3]) -> Vec<String> {
        names
            .into_iter()
            .zip([&self.ca, &self.cert, &self.key])
            .flat_map(|(name, path)| [name.to_owned(), path.display().to_string()])
            .collect()
    }
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = params.self_signed(&key)?;
        let dir = tempfile::Builder::new().prefix("legate-pki-").tempdir()?;
        let pki = Self { ca, key, dir };
        std::fs::write(pki.ca_file(), pki.ca.pem())?;
        Ok(pki)
    }

    /// The CA certificate's file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `names` (DNS names or IP addresses; the first is also the common name,
    /// which etcd takes as the user name), valid now.
    pub fn issue(&self, names: &[&str]) -> Result<Issued> {
        self.sign(names, false)
    }

    /// A TLS server configuration for `names` that wants a client certificate signed by this
    /// CA: what an engine behind TLS (Docker's `--tlsverify`) does.
    pub fn server_config(&self, names: &[&str]) -> Result<Arc<rustls::ServerConfig>> {
        let key = KeyPair::generate()?;
        let params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &self.ca, &self.key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        Ok(Arc::new(config))
    }

    /// A certificate for `names` that expired years ago.
    pub fn issue_expired(&self, names: &[&str]) -> Result<Issued> {
        self.sign(names, true)
    }

    fn sign(&self, names: &[&str], expired: bool) -> Result<Issued> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        if expired {
            params.not_before = date_time_ymd(2001, 1, 1);
            params.not_after = date_time_ymd(2002, 1, 1);
        }
        let cert = params.signed_by(&key, &self.ca, &self.key)?;
        let stem = format!(
            "{}{}",
            names.first().copied().unwrap_or("anonymous"),
            if expired { "-expired" } else { "" }
        );
        let issued = Issued {
            ca: self.ca_file(),
            cert: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}-key.pem")),
        };
        std::fs::write(&issued.cert, cert.pem())?;
        std::fs::write(&issued.key, key.serialize_pem())?;
        Ok(issued)
    }
}
