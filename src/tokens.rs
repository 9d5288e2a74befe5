//! Secrets handed out once (invitation tokens): 256 random bits, of which only the SHA-256
//! is ever stored.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Service account keys start with this, so a bearer token can be told apart cheaply.
pub const SERVICE_ACCOUNT_PREFIX: &str = "sa_";

/// A freshly generated secret and the hash that is stored in its place.
pub struct IssuedSecret {
    pub secret: String,
    pub sha256: String,
}

/// A new secret with a recognizable prefix (`inv_...`), so leaked ones are easy to find.
pub fn issue(prefix: &str) -> IssuedSecret {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = format!("{prefix}_{}", BASE64URL.encode(bytes));
    let sha256 = sha256_hex(&secret);
    IssuedSecret { secret, sha256 }
}

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_secrets_are_unique_and_hash_to_what_is_stored() {
        let a = issue("inv");
        let b = issue("inv");
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with("inv_") && a.secret.len() > 40);
        assert_eq!(sha256_hex(&a.secret), a.sha256);
        assert_eq!(a.sha256.len(), 64);
    }
}
