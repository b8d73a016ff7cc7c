//! The node's identity: an ECDSA P-256 key pair. Every Fleet call is signed, even on an
//! insecure (plain HTTP) SuperLink: the node sends its public key (PEM, base64), an ISO-8601
//! UTC timestamp and an ECDSA-SHA256 signature of that timestamp (DER, base64).

use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};

use crate::error::{FlowerError, Result};

/// Header carrying the node's public key.
pub const PUBLIC_KEY_HEADER: &str = "flwr-public-key";
/// Header carrying the signed timestamp.
pub const TIMESTAMP_HEADER: &str = "flwr-timestamp";
/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "flwr-signature";

/// A node's key pair.
#[derive(Clone)]
pub struct NodeIdentity {
    key: SigningKey,
    public_pem: String,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("NodeIdentity")
            .field("public_key", &self.public_pem)
            .finish()
    }
}

impl NodeIdentity {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Result<Self> {
        let key = SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        Self::from_key(key)
    }

    fn from_key(key: SigningKey) -> Result<Self> {
        let public_pem = key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| FlowerError::Config(format!("cannot encode the public key: {e}")))?;
        Ok(NodeIdentity { key, public_pem })
    }

    /// Loads the PKCS#8 PEM private key at `path`, or creates one there (readable by the
    /// owner only) if the file does not exist, so a restarted node keeps its identity.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(pem) => {
                let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
                    FlowerError::Config(format!(
                        "{}: not a PKCS#8 PEM P-256 private key: {e}",
                        path.display()
                    ))
                })?;
                Self::from_key(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Self::generate()?;
                let pem = identity
                    .key
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| FlowerError::Config(format!("cannot encode the key: {e}")))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| FlowerError::io(dir, e))?;
                }
                write_private(path, pem.as_bytes())?;
                Ok(identity)
            }
            Err(e) => Err(FlowerError::io(path, e)),
        }
    }

    /// The public key as PEM (`SubjectPublicKeyInfo`), as sent in register/activate.
    pub fn public_key_pem(&self) -> &[u8] {
        self.public_pem.as_bytes()
    }

    /// The three authentication headers for a call made now.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        self.headers_at(&now_iso8601())
    }

    /// The authentication headers for `timestamp`.
    pub fn headers_at(&self, timestamp: &str) -> [(&'static str, String); 3] {
        let signature: Signature = self.key.sign(timestamp.as_bytes());
        [
            (PUBLIC_KEY_HEADER, BASE64.encode(self.public_pem.as_bytes())),
            (TIMESTAMP_HEADER, timestamp.to_string()),
            (
                SIGNATURE_HEADER,
                BASE64.encode(signature.to_der().as_bytes()),
            ),
        ]
    }
}

/// The current time as ISO-8601 with microseconds and a `+00:00` offset (what the
/// SuperLink's Python `datetime.isoformat()` produces).
pub fn now_iso8601() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| FlowerError::io(path, e))?;
    file.write_all(bytes).map_err(|e| FlowerError::io(path, e))
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| FlowerError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::ecdsa::VerifyingKey;
    use p256::pkcs8::DecodePublicKey;

    #[test]
    fn headers_carry_a_verifiable_signature_of_the_timestamp() {
        let identity = NodeIdentity::generate().unwrap();
        let [(k, key), (t, stamp), (s, sig)] =
            identity.headers_at("2026-11-29T12:00:00.000000+00:00");
        assert_eq!(
            (k, t, s),
            (PUBLIC_KEY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
        );
        let pem = String::from_utf8(BASE64.decode(key).unwrap()).unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        let verifying = VerifyingKey::from_public_key_pem(&pem).unwrap();
        let signature = Signature::from_der(&BASE64.decode(sig).unwrap()).unwrap();
        assert!(verifying.verify(stamp.as_bytes(), &signature).is_ok());
        assert!(verifying.verify(b"another time", &signature).is_err());
    }

    #[test]
    fn timestamps_have_a_utc_offset() {
        let stamp = now_iso8601();
        assert!(stamp.ends_with("+00:00"), "{stamp}");
        assert!(chrono::DateTime::parse_from_rfc3339(&stamp).is_ok());
    }

    #[test]
    fn a_saved_key_is_reused() {
        let dir = std::env::temp_dir().join(format!("segviz-flower-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("node.pem");
        let first = NodeIdentity::load_or_create(&path).unwrap();
        let second = NodeIdentity::load_or_create(&path).unwrap();
        assert_eq!(first.public_key_pem(), second.public_key_pem());
        std::fs::write(&path, "not a key").unwrap();
        assert!(NodeIdentity::load_or_create(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
