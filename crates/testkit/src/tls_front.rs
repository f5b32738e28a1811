//! A TLS front for a plain-HTTP test server (the token server): `https://127.0.0.1:<port>`
//! with a certificate from a fixed test CA, forwarding each connection's bytes unchanged.
//!
//! The token server speaks plain HTTP; TLS verification tests (a self-signed endpoint refused,
//! accepted with the right `caBundleRef`) need a real handshake in front of it. The front
//! counts handshakes, so a test can tell "refused during the handshake" (the token server saw
//! nothing) from "never tried" (the front saw nothing either).
//!
//! The test PKI (P-256, valid 2024–2124) is the one the product's transport unit tests use: a
//! CA ([`TEST_CA_PEM`]) and a leaf for `localhost` and `127.0.0.1` signed by it.
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// The test CA: what a `caBundleRef` must hold to trust the front.
pub const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBazCCARGgAwIBAgIBATAKBggqhkjOPQQDAjAcMRowGAYDVQQDDBF2YXVsdGNv
bm4gdGVzdCBDQTAgFw0yNDAxMDEwMDAwMDBaGA8yMTI0MDEwMTAwMDAwMFowHDEa
MBgGA1UEAwwRdmF1bHRjb25uIHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMB
BwNCAARcJ7n7MfvHadBvkwhrYf48r5eIvxXdq8KxRDa0pOe04nB61xb7Y1kMY7ha
IbCpQ9jR7KMxD8gxq5roJVzoe0tTo0IwQDAPBgNVHRMBAf8EBTADAQH/MA4GA1Ud
DwEB/wQEAwIBBjAdBgNVHQ4EFgQUSnpBqcONZtuJDKwGnq4fLvz7lt4wCgYIKoZI
zj0EAwIDSAAwRQIgbydQceqeronOZYL93OkshqcpK+3snJepH6ZYoAy3YYsCIQD+
Sdy3KeV2mxeYYsr8zGFoPeW3N+5dRElSkhoZjmc8/A==
-----END CERTIFICATE-----
";

/// The front's certificate (CN `localhost`, SAN `localhost` and `127.0.0.1`, not a CA): a
/// bundle holding only this is not a trust anchor.
pub const TEST_LEAF_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBtDCCAVqgAwIBAgIBAjAKBggqhkjOPQQDAjAcMRowGAYDVQQDDBF2YXVsdGNv
bm4gdGVzdCBDQTAgFw0yNDAxMDEwMDAwMDBaGA8yMTI0MDEwMTAwMDAwMFowFDES
MBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEkH/4
p5pkQDXVdE4hMvHlHrWt+52nSr20Gq/HfpjbAhKUdM+w8KMA1w+Ea20QPPC4wKZQ
zLqzMPXmFXT5hzeZXqOBkjCBjzAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB/wQEAwIH
gDATBgNVHSUEDDAKBggrBgEFBQcDATAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8A
AAEwHQYDVR0OBBYEFBs+Yb1I6sUIK4gjOASlEXCf9K5tMB8GA1UdIwQYMBaAFEp6
QanDjWbbiQysBp6uHy78+5beMAoGCCqGSM49BAMCA0gAMEUCIQDTgb54nXHfQcE5
P+1SmgNr5SZBzqU9PoqAE/EZ7fStmAIgMZ53FiMKam4k+pQtsdZ08MT4Dh1MDjbI
asFkTLRxiCs=
-----END CERTIFICATE-----
";

const TEST_LEAF_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgMFRbYMcuheE5gDeK
dXjxYIDtXNpZo2YWmThXNj6FvayhRANCAASQf/inmmRANdV0TiEy8eUeta37nadK
vbQar8d+mNsCEpR0z7DwowDXD4RrbRA88LjAplDMurMw9eYVdPmHN5le
-----END PRIVATE KEY-----
";

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    handshakes: AtomicUsize,
    failed_handshakes: AtomicUsize,
}

/// A TLS listener on `127.0.0.1:<random port>` forwarding to a plain-HTTP upstream. Stops when
/// dropped.
pub struct TlsFront {
    addr: SocketAddr,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl TlsFront {
    /// Listen in front of `upstream` (a loopback address), on the calling test's runtime.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        crate::install_crypto_provider();
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(TEST_LEAF_PEM.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(io::Error::other)?;
        let key =
            PrivateKeyDer::from_pem_slice(TEST_LEAF_KEY.as_bytes()).map_err(io::Error::other)?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(io::Error::other)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn({
            let counts = Arc::clone(&counts);
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    counts.accepted.fetch_add(1, Ordering::SeqCst);
                    let (acceptor, counts) = (acceptor.clone(), Arc::clone(&counts));
                    tokio::spawn(async move {
                        let mut tls = match acceptor.accept(tcp).await {
                            Ok(tls) => {
                                counts.handshakes.fetch_add(1, Ordering::SeqCst);
                                tls
                            }
                            Err(_) => {
                                counts.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        };
                        if let Ok(mut up) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                        }
                    });
                }
            }
        });
        Ok(TlsFront { addr, counts, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `https://<host>:<port><path>`; `host` is `127.0.0.1` or `localhost` (the names the
    /// certificate holds).
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.addr.port())
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Completed TLS handshakes (the client trusted the certificate).
    pub fn handshakes(&self) -> usize {
        self.counts.handshakes.load(Ordering::SeqCst)
    }

    /// Handshakes the client broke off (e.g. it did not trust the certificate).
    pub fn failed_handshakes(&self) -> usize {
        self.counts.failed_handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
