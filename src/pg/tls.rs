//! TLS to Postgres, with libpq's `sslmode` and `sslrootcert` semantics, over rustls (ring).
//!
//! One [`PgTls`] serves both kinds of connection: our replication client calls
//! [`PgTls::handshake`] after its own SSLRequest, and tokio-postgres takes it as its
//! [`MakeTlsConnect`] (the pool and the snapshot holders).
//!
//! What each mode checks, as libpq does:
//! - `disable`: never TLS.
//! - `prefer` (the default): TLS when the server offers it, plain when it answers 'N'.
//! - `require`: TLS or nothing.
//! - `verify-ca`: TLS, and the server's chain must lead to a root of `PGSSLROOTCERT`.
//! - `verify-full`: that, and the certificate must name the host we connected to.
//!
//! `prefer` and `require` check nothing, unless a root certificate file is there (given,
//! or libpq's default `~/.postgresql/root.crt`): then they check the chain like
//! `verify-ca`. Over a Unix socket no mode asks for TLS (libpq neither).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// libpq's `sslmode`, less `allow` (plain first, TLS only if the server insists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SslMode, String> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            _ => Err(format!("unknown sslmode {s:?} (disable, prefer, require, verify-ca or verify-full)")),
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// What the operator configured (PGSSLMODE, PGSSLROOTCERT, PGSSLCERT, PGSSLKEY).
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// A PEM file of trusted roots, or `system` for the platform's trust store
    /// (verify-full only, as in libpq). None: `~/.postgresql/root.crt` if it exists.
    pub root_cert: Option<String>,
    /// A client certificate (PEM chain) and its key. None: `~/.postgresql/postgresql.crt`
    /// and `postgresql.key` if they exist.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// TLS as our connections use it: the mode and, unless it is `disable`, the rustls
/// configuration built from the settings once, at start.
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    config: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgTls({})", self.mode)
    }
}

impl PgTls {
    /// Never TLS.
    pub fn disabled() -> PgTls {
        PgTls { mode: SslMode::Disable, config: None }
    }

    /// Reads the certificate files the settings name; a file that is named but cannot
    /// be read is an error here rather than at the first connection.
    pub fn new(settings: &TlsSettings) -> Result<PgTls, String> {
        let mode = settings.mode;
        if mode == SslMode::Disable {
            return Ok(PgTls::disabled());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = load_roots(settings)?;
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            Some(roots) => {
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("PGSSLROOTCERT: {e}"))?;
                if mode == SslMode::VerifyFull { webpki } else { Arc::new(AnyName(webpki)) }
            }
            None => Arc::new(Unverified(provider.signature_verification_algorithms)),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match load_client_cert(settings)? {
            Some((chain, key)) => {
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("PGSSLCERT/PGSSLKEY: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(PgTls { mode, config: Some(Arc::new(config)) })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Whether a connection to `host` asks the server for TLS at all.
    pub fn wanted(&self, host: &str) -> bool {
        self.config.is_some() && !host.starts_with('/')
    }

    /// The mode tokio-postgres enforces: it knows no verify-*, which our verifier does.
    pub(crate) fn tokio_mode(&self, host: &str) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self.mode {
            _ if !self.wanted(host) => T::Disable,
            SslMode::Disable => T::Disable,
            SslMode::Prefer => T::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => T::Require,
        }
    }

    /// What went wrong when a tokio-postgres connection failed over TLS: our handshake's
    /// [`TlsFailure`], or a server that declined the TLS the mode requires (tokio-postgres'
    /// own error, which only its message tells apart). None for any other error.
    pub fn failure(&self, e: &tokio_postgres::Error) -> Option<String> {
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if let Some(failure) = s.downcast_ref::<TlsFailure>() {
                return Some(failure.0.clone());
            }
            source = s.source();
        }
        let cause = std::error::Error::source(e).map_or_else(String::new, |c| format!(": {c}"));
        e.to_string()
            .starts_with("error performing TLS handshake")
            .then(|| format!("TLS with Postgres failed (PGSSLMODE={}){cause}", self.mode))
    }

    /// The TLS handshake on a stream whose SSLRequest the server accepted.
    pub async fn handshake<S>(&self, stream: S, host: &str) -> Result<TlsStream<S>, TlsFailure>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let fail = |cause: String| TlsFailure(format!("TLS with Postgres failed (PGSSLMODE={}): {cause}", self.mode));
        let config = self.config.clone().ok_or_else(|| fail("TLS is disabled".into()))?;
        let name = ServerName::try_from(host.to_owned()).map_err(|e| fail(format!("host {host:?}: {e}")))?;
        TlsConnector::from(config).connect(name, stream).await.map_err(|e| fail(e.to_string()))
    }
}

/// Why a TLS connection to Postgres failed, naming the mode.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsFailure(pub String);

fn home_file(name: &str) -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql").join(name))
}

/// The roots to check the server's chain against, or None for no check.
fn load_roots(settings: &TlsSettings) -> Result<Option<RootCertStore>, String> {
    let mode = settings.mode;
    let verify = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
    let path = match settings.root_cert.as_deref() {
        Some("system") if mode != SslMode::VerifyFull => {
            return Err(format!("PGSSLROOTCERT=system needs PGSSLMODE=verify-full (it is {mode}), as in libpq"));
        }
        Some("system") => return system_roots().map(Some),
        Some(p) => PathBuf::from(p),
        None => match home_file("root.crt") {
            Some(p) if p.exists() => p,
            // libpq: prefer and require do without; verify-* cannot.
            _ if verify => {
                return Err(format!(
                    "PGSSLMODE={mode} needs root certificates: set PGSSLROOTCERT (~/.postgresql/root.crt does not exist)"
                ));
            }
            _ => return Ok(None),
        },
    };
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&path).map_err(|e| format!("PGSSLROOTCERT {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("PGSSLROOTCERT {}: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("PGSSLROOTCERT {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("PGSSLROOTCERT {}: no certificate in the file", path.display()));
    }
    Ok(Some(roots))
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(format!(
            "PGSSLROOTCERT=system: no usable certificate in the system's trust store {:?}",
            found.errors
        ));
    }
    Ok(roots)
}

type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The client certificate and key, when configured or present where libpq looks.
fn load_client_cert(settings: &TlsSettings) -> Result<Option<ClientCert>, String> {
    let cert = match &settings.client_cert {
        Some(p) => p.clone(),
        None => match home_file("postgresql.crt") {
            Some(p) if p.exists() => p,
            _ => return Ok(None),
        },
    };
    let key = settings
        .client_key
        .clone()
        .or_else(|| home_file("postgresql.key"))
        .ok_or_else(|| "PGSSLKEY: no key for the client certificate".to_owned())?;
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("PGSSLCERT {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("PGSSLKEY {}: {e}", key.display()))?;
    Ok(Some((chain, key)))
}

/// verify-ca (and prefer/require with a root file): the chain must verify, but the
/// certificate need not name the host, so rustls' verifier runs in full and only its
/// name mismatch, checked after the chain, is forgiven.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer and require without roots: encryption only, as libpq. Any certificate is
/// taken, but the handshake signature is still checked, so the peer holds its key.
#[derive(Debug)]
struct Unverified(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

// The tokio-postgres side: a connector per connection, made from the shared config.

/// [`PgTls`] for one tokio-postgres connection to `host`.
pub struct PgTlsConnect {
    tls: PgTls,
    host: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for PgTls {
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = TlsFailure;

    fn make_tls_connect(&mut self, host: &str) -> Result<PgTlsConnect, TlsFailure> {
        Ok(PgTlsConnect { tls: self.clone(), host: host.to_owned() })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for PgTlsConnect {
    type Stream = PgTlsStream<S>;
    type Error = TlsFailure;
    type Future = Pin<Box<dyn Future<Output = Result<PgTlsStream<S>, TlsFailure>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { self.tls.handshake(stream, &self.host).await.map(|s| PgTlsStream(Box::new(s))) })
    }
}

/// A TLS stream as tokio-postgres wants it. No channel binding: SCRAM-SHA-256-PLUS
/// would need the hash of the server certificate by its own signature algorithm.
pub struct PgTlsStream<S>(Box<TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_libpq_spells_them() {
        for m in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            assert_eq!(m.parse::<SslMode>().unwrap().to_string(), m);
        }
        assert!("allow".parse::<SslMode>().is_err());
        assert!("VERIFY-FULL".parse::<SslMode>().is_err());
    }

    #[test]
    fn verify_modes_need_roots() {
        let settings = |mode, root: Option<&str>| TlsSettings {
            mode,
            root_cert: root.map(str::to_owned),
            client_cert: None,
            client_key: None,
        };
        let missing = "/nonexistent/root.crt";
        assert!(PgTls::new(&settings(SslMode::VerifyCa, Some(missing))).unwrap_err().contains(missing));
        assert!(PgTls::new(&settings(SslMode::Require, Some("system"))).unwrap_err().contains("verify-full"));
        assert_eq!(PgTls::new(&settings(SslMode::Disable, Some(missing))).unwrap().mode(), SslMode::Disable);
    }

    #[test]
    fn unix_sockets_never_ask_for_tls() {
        let tls = PgTls::new(&TlsSettings { mode: SslMode::Prefer, ..TlsSettings::default() }).unwrap();
        assert!(tls.wanted("db.example"));
        assert!(!tls.wanted("/var/run/postgresql"));
        assert_eq!(tls.tokio_mode("/var/run/postgresql"), tokio_postgres::config::SslMode::Disable);
    }
}
