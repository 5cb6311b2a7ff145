//! TLS for the `syslog` and `http` outputs: rustls (the `ring` provider),
//! TLS 1.2 and 1.3, the receiver's certificate always verified.
//!
//! - Trust: the CA certificates of `tls.ca_file` (PEM), or, without one,
//!   the Mozilla roots compiled in (`webpki-roots`). Nothing turns
//!   verification off.
//! - Client authentication: `tls.cert_file` (the agent's certificate and
//!   its chain, PEM) with `tls.key_file` (PKCS#8, PKCS#1 or SEC1 PEM); a
//!   key that group or others may read is used, with a warning.
//! - The files are read and checked when agent.yaml is (a missing file, a
//!   file without a certificate or key, a certificate without its key, is
//!   refused naming the field), and read again at each new connection of
//!   a syslog output and after each failed delivery of an http output, so
//!   renewed certificates are picked up without a restart. They must be
//!   readable by the user the agent runs as (`run_as`).
//!
//! Built only with the `tls` feature (on by default); without it a
//! `tls:` block or an `https://` URL is refused at config time.

use crate::config::outputs::TlsSpec;

/// Checks `spec` as agent.yaml is read: `Err((field, reason))`, the field
/// relative to the `tls` block (`ca_file`).
pub fn check(spec: &TlsSpec) -> Result<(), (&'static str, String)> {
    #[cfg(feature = "tls")]
    {
        imp::Material::load(spec).map(drop)
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = spec;
        Err(("tls", "this agent was built without TLS (cargo feature `tls`)".to_owned()))
    }
}

#[cfg(feature = "tls")]
pub use imp::{TlsStream, ureq_config};

#[cfg(feature = "tls")]
mod imp {
    use std::io::ErrorKind;
    use std::net::TcpStream;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use rustls::client::ResolvesClientCert;
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::sign::CertifiedKey;
    use rustls::{
        ClientConfig, ClientConnection, ProtocolVersion, RootCertStore, SignatureScheme, StreamOwned,
    };

    use crate::config::outputs::TlsSpec;

    /// What the files of a `tls` block hold.
    pub(super) struct Material {
        /// The CA certificates of `ca_file`; `None`: the Mozilla roots.
        cas: Option<Vec<CertificateDer<'static>>>,
        /// The agent's certificate chain and key.
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    }

    impl Material {
        /// Reads and parses the files of `spec`.
        pub(super) fn load(spec: &TlsSpec) -> Result<Material, (&'static str, String)> {
            let cas = match &spec.ca_file {
                Some(path) => Some(certificates(path).map_err(|e| ("ca_file", e))?),
                None => None,
            };
            let identity = match (&spec.cert_file, &spec.key_file) {
                (None, None) => None,
                (Some(_), None) => return Err(("key_file", "cert_file needs its key_file".to_owned())),
                (None, Some(_)) => return Err(("cert_file", "key_file needs its cert_file".to_owned())),
                (Some(cert), Some(key)) => {
                    let chain = certificates(cert).map_err(|e| ("cert_file", e))?;
                    Some((chain, private_key(key).map_err(|e| ("key_file", e))?))
                }
            };
            if let Some(name) = &spec.server_name
                && ServerName::try_from(name.as_str()).is_err()
            {
                return Err(("server_name", format!("{name:?} is not a DNS name or an IP address")));
            }
            Ok(Material { cas, identity })
        }
    }

    /// The certificates of a PEM file (at least one).
    fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let certs = CertificateDer::pem_slice_iter(&text)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate (-----BEGIN CERTIFICATE-----) in it", path.display()));
        }
        Ok(certs)
    }

    /// The private key of a PEM file; warns when others may read it.
    fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if daemoneye_platform::files::readable_by_others(path).unwrap_or(false) {
            log::warn!("the private key {} may be read by group or others (chmod 600 it)", path.display());
        }
        PrivateKeyDer::from_pem_slice(&text)
            .map_err(|e| format!("{}: no private key in it: {e}", path.display()))
    }

    /// The agent's certificate, if it has one, and whether the server
    /// asked for one (then, over TLS 1.3, the server's verdict on it comes
    /// after the client's handshake is over).
    #[derive(Debug)]
    struct Identity {
        key: Option<Arc<CertifiedKey>>,
        asked: AtomicBool,
    }

    impl ResolvesClientCert for Identity {
        fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            self.asked.store(true, Ordering::Relaxed);
            self.key.clone()
        }

        fn has_certs(&self) -> bool {
            self.key.is_some()
        }
    }

    /// A rustls configuration of `spec` (its files read now) and its
    /// client identity.
    fn client_config(spec: &TlsSpec) -> Result<(Arc<ClientConfig>, Arc<Identity>), String> {
        let m = Material::load(spec).map_err(|(field, e)| format!("tls.{field}: {e}"))?;
        let mut roots = RootCertStore::empty();
        match m.cas {
            Some(cas) => {
                let (_, ignored) = roots.add_parsable_certificates(cas);
                if roots.is_empty() {
                    return Err(format!("tls.ca_file: none of its {ignored} certificates is usable as a CA"));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        // ring: deprecated by rustls 0.23.48 for lacking post-quantum key
        // exchange; aws-lc-rs, which has it, needs cmake and a C
        // toolchain for every target we build. ureq's https uses ring too.
        #[allow(deprecated)]
        let provider: CryptoProvider = rustls::crypto::ring::default_provider();
        let key = match m.identity {
            Some((chain, key)) => Some(Arc::new(
                CertifiedKey::from_der(chain, key, &provider).map_err(|e| format!("tls.key_file: {e}"))?,
            )),
            None => None,
        };
        let identity = Arc::new(Identity { key, asked: AtomicBool::new(false) });
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(identity.clone());
        Ok((Arc::new(config), identity))
    }

    /// A TLS session over a `TcpStream` (blocking, with timeouts).
    pub struct TlsStream {
        /// The session and its socket.
        pub stream: StreamOwned<ClientConnection, TcpStream>,
        identity: Arc<Identity>,
    }

    impl TlsStream {
        /// A TLS client of `spec` (its files read now) over `tcp` to
        /// `host` (the name checked in the receiver's certificate).
        pub fn new(spec: &TlsSpec, host: &str, tcp: TcpStream) -> Result<TlsStream, String> {
            let (config, identity) = client_config(spec)?;
            let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            let name = ServerName::try_from(host.to_owned())
                .map_err(|_| format!("{host:?} is not a DNS name or an IP address for TLS"))?;
            let conn = ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
            Ok(TlsStream { stream: StreamOwned::new(conn, tcp), identity })
        }

        /// Completes the handshake (within the socket's timeouts). Over
        /// TLS 1.3 the client is done before the server has checked the
        /// client's certificate, and a server that refuses it says so
        /// afterwards: when the server asked for one, waits up to
        /// `verdict` for its first word (a session ticket: accepted; an
        /// alert or a close: refused). A server that sends no tickets
        /// costs that wait once per connection.
        pub fn handshake(&mut self, verdict: Duration) -> Result<(), String> {
            let StreamOwned { conn, sock } = &mut self.stream;
            while conn.is_handshaking() {
                conn.complete_io(sock).map_err(|e| format!("TLS handshake: {e}"))?;
            }
            let tls13 = conn.protocol_version() == Some(ProtocolVersion::TLSv1_3);
            if !(tls13 && self.identity.asked.load(Ordering::Relaxed)) {
                return Ok(());
            }
            let timeout = sock.read_timeout().map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(verdict)).map_err(|e| e.to_string())?;
            let refused = |e: String| {
                format!("TLS handshake: refused by the receiver after it asked for a client certificate: {e}")
            };
            let outcome = loop {
                if conn.tls13_tickets_received() > 0 {
                    break Ok(());
                }
                match conn.read_tls(sock) {
                    Ok(0) => break Err(refused("it closed the connection".to_owned())),
                    Ok(_) => {
                        if let Err(e) = conn.process_new_packets() {
                            break Err(refused(e.to_string()));
                        }
                    }
                    // Nothing said within the wait: taken as accepted.
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break Ok(()),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => break Err(refused(e.to_string())),
                }
            };
            sock.set_read_timeout(timeout).map_err(|e| e.to_string())?;
            outcome
        }
    }

    /// ureq's TLS configuration of `spec` (its files read now).
    pub fn ureq_config(spec: &TlsSpec) -> Result<ureq::tls::TlsConfig, String> {
        use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};
        let m = Material::load(spec).map_err(|(field, e)| format!("tls.{field}: {e}"))?;
        let ours = |certs: &[CertificateDer<'static>]| -> Vec<Certificate<'static>> {
            certs.iter().map(|c| Certificate::from_der(c.as_ref()).to_owned()).collect()
        };
        let roots = match &m.cas {
            Some(cas) => RootCerts::new_with_certs(&ours(cas)),
            None => RootCerts::WebPki,
        };
        let mut builder = TlsConfig::builder().provider(TlsProvider::Rustls).root_certs(roots);
        if let (Some((chain, _)), Some(key_file)) = (&m.identity, &spec.key_file) {
            // ureq takes the key as PEM (its kind is not public): the
            // file again, just checked by `load`.
            let pem =
                std::fs::read(key_file).map_err(|e| format!("tls.key_file: {}: {e}", key_file.display()))?;
            let key = PrivateKey::from_pem(&pem)
                .map_err(|e| format!("tls.key_file: {}: {e}", key_file.display()))?;
            builder = builder.client_cert(Some(ClientCert::new_with_certs(&ours(chain), key)));
        }
        Ok(builder.build())
    }
}
