//! Certificates for TLS tests: one authority that signs a broker certificate (for
//! `localhost` and 127.0.0.1) and a client certificate, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// PEM files of a test PKI, in the directory given to [`Pki::generate`].
pub struct Pki {
    /// The authority's certificate: what both sides trust.
    pub ca_file: PathBuf,
    /// The broker's certificate, signed by the authority.
    pub server_cert: PathBuf,
    /// The broker's private key.
    pub server_key: PathBuf,
    /// A client certificate, signed by the authority, for brokers that require one.
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
    /// A second authority's certificate, which signed nothing here: trusting it alone
    /// must fail the handshake.
    pub other_ca_file: PathBuf,
}

impl Pki {
    /// Generates the authority and both certificates into `dir`.
    pub fn generate(dir: &Path) -> Pki {
        let (ca_pem, issuer) = authority("Weir test CA");
        let (other_ca_pem, _) = authority("Weir unrelated CA");
        let server_key = KeyPair::generate().expect("key generation works");
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("valid subject names");
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .expect("the CA signs the broker certificate");
        let client_key = KeyPair::generate().expect("key generation works");
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("no names is valid");
        client
            .distinguished_name
            .push(DnType::CommonName, "weir-client");
        let client_cert = client
            .signed_by(&client_key, &issuer)
            .expect("the CA signs the client certificate");
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("PEM files can be written");
            path
        };
        Pki {
            ca_file: write("ca.pem", ca_pem),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            client_cert: write("client.pem", client_cert.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
            other_ca_file: write("other-ca.pem", other_ca_pem),
        }
    }
}

/// A self-signed authority: its certificate as PEM, and the issuer that signs with it.
fn authority(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("key generation works");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names is valid");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params
        .self_signed(&key)
        .expect("the authority signs itself");
    (cert.pem(), Issuer::new(params, key))
}
