//! Sealing personal data with an organization's data key (XChaCha20-Poly1305).
//!
//! Every string under a key named in [`orgledger_domain::PERSONAL_DATA_FIELDS`] or
//! [`orgledger_domain::SECRET_FIELDS`] is replaced
//! by `enc:v1:<base64(nonce || ciphertext)>`, bound to the organization id as associated data
//! so ciphertext cannot be moved between organizations. The JSON shape is kept, so a payload
//! whose key is destroyed still deserializes, with [`orgledger_domain::ERASED`] in each field.

use base64::engine::general_purpose::STANDARD_NO_PAD as BASE64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use orgledger_domain::{ERASED, PERSONAL_DATA_FIELDS, SECRET_FIELDS};
use serde_json::Value;

pub const SEALED_PREFIX: &str = "enc:v1:";
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value failed authentication (wrong key or tampered)")]
    Authentication,
}

/// A 256-bit symmetric key.
#[derive(Clone)]
pub struct DataKey(Key);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    pub fn generate() -> Self {
        Self(XChaCha20Poly1305::generate_key(&mut OsRng))
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        (bytes.len() == 32).then(|| Self(*Key::from_slice(bytes)))
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// `nonce || ciphertext`.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = XChaCha20Poly1305::new(&self.0)
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    pub fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Malformed);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        XChaCha20Poly1305::new(&self.0)
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| SealError::Authentication)
    }

    pub fn seal_str(&self, plaintext: &str, aad: &[u8]) -> String {
        format!(
            "{SEALED_PREFIX}{}",
            BASE64.encode(self.encrypt(plaintext.as_bytes(), aad))
        )
    }

    pub fn open_str(&self, sealed: &str, aad: &[u8]) -> Result<String, SealError> {
        let encoded = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or(SealError::Malformed)?;
        let bytes = BASE64.decode(encoded).map_err(|_| SealError::Malformed)?;
        String::from_utf8(self.decrypt(&bytes, aad)?).map_err(|_| SealError::Malformed)
    }
}

/// Seals every personal-data string in `value` in place.
pub fn seal_personal_data(value: &mut Value, key: &DataKey, aad: &[u8]) {
    visit_personal_strings(value, false, &mut |text| {
        *text = key.seal_str(text, aad);
        Ok(())
    })
    .expect("sealing never fails");
}

/// Opens every sealed string in `value` in place; with no key (the organization was purged)
/// each becomes [`ERASED`].
pub fn open_personal_data(
    value: &mut Value,
    key: Option<&DataKey>,
    aad: &[u8],
) -> Result<(), SealError> {
    visit_personal_strings(value, false, &mut |text| {
        *text = match key {
            Some(key) => key.open_str(text, aad)?,
            None => ERASED.to_owned(),
        };
        Ok(())
    })
}

fn visit_personal_strings(
    value: &mut Value,
    personal: bool,
    f: &mut dyn FnMut(&mut String) -> Result<(), SealError>,
) -> Result<(), SealError> {
    match value {
        Value::String(text) if personal => f(text),
        Value::Object(map) => map.iter_mut().try_for_each(|(name, child)| {
            let sealed_key = PERSONAL_DATA_FIELDS.contains(&name.as_str())
                || SECRET_FIELDS.contains(&name.as_str());
            visit_personal_strings(child, personal || sealed_key, f)
        }),
        Value::Array(items) => items
            .iter_mut()
            .try_for_each(|child| visit_personal_strings(child, personal, f)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn personal_fields_are_sealed_and_opened_back_in_place() {
        let key = DataKey::generate();
        let original = json!({"MemberProfileUpdated": {
            "user_id": "mia",
            "first_name": {"from": null, "to": "Mia"},
            "locked_fields": {"from": [], "to": ["title"]},
            "email": "mia@example.com"
        }});
        let mut sealed = original.clone();
        seal_personal_data(&mut sealed, &key, b"org-1");
        let text = sealed.to_string();
        assert!(
            !text.contains("Mia") && !text.contains("mia@example.com"),
            "{text}"
        );
        assert!(
            text.contains("\"user_id\":\"mia\""),
            "non-personal fields stay readable"
        );
        assert!(text.contains("[\"title\"]"));
        open_personal_data(&mut sealed, Some(&key), b"org-1").unwrap();
        assert_eq!(sealed, original);
    }

    #[test]
    fn secrets_are_sealed_like_personal_data() {
        let key = DataKey::generate();
        let mut value =
            json!({"AiProviderAdded": {"api_key": "sk-live-123456", "api_key_last4": "3456"}});
        seal_personal_data(&mut value, &key, b"org-1");
        let text = value.to_string();
        assert!(!text.contains("sk-live"), "{text}");
        assert!(text.contains("3456"), "the last four stay readable");
    }

    #[test]
    fn without_the_key_personal_data_reads_as_erased() {
        let key = DataKey::generate();
        let mut value = json!({"email": "mia@example.com", "role": "member"});
        seal_personal_data(&mut value, &key, b"org-1");
        open_personal_data(&mut value, None, b"org-1").unwrap();
        assert_eq!(value, json!({"email": ERASED, "role": "member"}));
    }

    #[test]
    fn ciphertext_is_bound_to_its_organization() {
        let key = DataKey::generate();
        let mut value = json!({"email": "mia@example.com"});
        seal_personal_data(&mut value, &key, b"org-1");
        let error = open_personal_data(&mut value, Some(&key), b"org-2").unwrap_err();
        assert!(matches!(error, SealError::Authentication));
    }
}
