//! Sealing personal data with an organization's data key (XChaCha20-Poly1305).
//!
//! Every string under a key named in [`orgledger_domain::PERSONAL_DATA_FIELDS`] or
//! [`orgledger_domain::SECRET_FIELDS`] is replaced
//! by `enc:v1:<base64(nonce || ciphertext)>`, bound to the organization id as associated data
//! so ciphertext cannot be moved between organizations. The JSON shape is kept, so a payload
//! whose key is destroyed still deserializes, with [`orgledger_domain::ERASED`] in each field.
//!
//! XChaCha20-Poly1305 is HChaCha20 (from `chacha20`) deriving a subkey from the key and the
//! nonce's first 16 bytes, then ChaCha20-Poly1305 (from `ring`) under that subkey with the
//! nonce's last 8 bytes: the construction of draft-irtf-cfrg-xchacha, byte for byte what
//! the `chacha20poly1305` crate wrote before (tests check both ways and the draft's
//! vector), about five times faster on a field (BENCHMARKS.md).

use base64::engine::general_purpose::STANDARD_NO_PAD as BASE64;
use base64::Engine;
use chacha20::cipher::consts::U10;
use orgledger_domain::{ERASED, PERSONAL_DATA_FIELDS, SECRET_FIELDS, USER_KEYED_FIELDS};
use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use serde_json::Value;

pub const SEALED_PREFIX: &str = "enc:v1:";
const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value failed authentication (wrong key or tampered)")]
    Authentication,
}

/// A 256-bit symmetric key.
#[derive(Clone)]
pub struct DataKey([u8; KEY_LEN]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    pub fn generate() -> Self {
        let mut key = [0; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self(key)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The ChaCha20-Poly1305 key and nonce that an XChaCha20-Poly1305 `nonce` stands for.
    fn chacha_for(&self, nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
        let (derive_from, tail) = nonce.split_at(16);
        let subkey = chacha20::hchacha::<U10>(&self.0.into(), derive_from.into());
        let key =
            UnboundKey::new(&CHACHA20_POLY1305, &subkey).expect("HChaCha20 yields a 32-byte key");
        let mut chacha_nonce = [0; 12];
        chacha_nonce[4..].copy_from_slice(tail);
        (
            LessSafeKey::new(key),
            Nonce::assume_unique_for_key(chacha_nonce),
        )
    }

    /// `nonce || ciphertext || tag`, the nonce random.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.encrypt_with(&nonce, plaintext, aad)
    }

    fn encrypt_with(&self, nonce: &[u8; NONCE_LEN], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let (key, chacha_nonce) = self.chacha_for(nonce);
        let mut sealed =
            Vec::with_capacity(NONCE_LEN + plaintext.len() + CHACHA20_POLY1305.tag_len());
        sealed.extend_from_slice(nonce);
        sealed.extend_from_slice(plaintext);
        let tag = key
            .seal_in_place_separate_tag(chacha_nonce, Aad::from(aad), &mut sealed[NONCE_LEN..])
            .expect("ChaCha20-Poly1305 seals any in-memory buffer");
        sealed.extend_from_slice(tag.as_ref());
        sealed
    }

    pub fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let Some((nonce, ciphertext)) = sealed.split_first_chunk::<NONCE_LEN>() else {
            return Err(SealError::Malformed);
        };
        let (key, chacha_nonce) = self.chacha_for(nonce);
        let mut opened = ciphertext.to_vec();
        let plaintext_len = key
            .open_in_place(chacha_nonce, Aad::from(aad), &mut opened)
            .map_err(|_| SealError::Authentication)?
            .len();
        opened.truncate(plaintext_len);
        Ok(opened)
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
    visit_personal_strings(value, false, &mut Sealing::Seal { key, aad })
        .expect("sealing never fails");
}

/// Opens every sealed string in `value` in place; with no key (the organization was purged)
/// each becomes [`ERASED`].
pub fn open_personal_data(
    value: &mut Value,
    key: Option<&DataKey>,
    aad: &[u8],
) -> Result<(), SealError> {
    visit_personal_strings(value, false, &mut Sealing::Open { key, aad })
}

enum Sealing<'a> {
    Seal {
        key: &'a DataKey,
        aad: &'a [u8],
    },
    Open {
        key: Option<&'a DataKey>,
        aad: &'a [u8],
    },
}

impl Sealing<'_> {
    fn apply(&mut self, text: &mut String) -> Result<(), SealError> {
        *text = match self {
            Self::Seal { key, aad } => key.seal_str(text, aad),
            Self::Open {
                key: Some(key),
                aad,
            } => key.open_str(text, aad)?,
            Self::Open { key: None, .. } => ERASED.to_owned(),
        };
        Ok(())
    }
}

fn is_sealed_name(name: &str) -> bool {
    PERSONAL_DATA_FIELDS.contains(&name) || SECRET_FIELDS.contains(&name)
}

fn visit_personal_strings(
    value: &mut Value,
    personal: bool,
    sealing: &mut Sealing<'_>,
) -> Result<(), SealError> {
    match value {
        Value::String(text) if personal => sealing.apply(text),
        Value::Object(map) => {
            for (name, child) in map.iter_mut() {
                match child {
                    Value::Object(entries) if USER_KEYED_FIELDS.contains(&name.as_str()) => {
                        visit_user_keyed(entries, personal, sealing)?
                    }
                    _ => visit_personal_strings(child, personal || is_sealed_name(name), sealing)?,
                }
            }
            Ok(())
        }
        Value::Array(items) => items
            .iter_mut()
            .try_for_each(|child| visit_personal_strings(child, personal, sealing)),
        _ => Ok(()),
    }
}

/// The entries of an object keyed by names users chose: their keys say nothing about what
/// their values are. Versions before 2026-12-06 sealed an entry whose name was a personal
/// field's (a client called `email`): opened, it reads as it was; with no key, the entry is
/// dropped, since `[erased]` is no value it could hold.
fn visit_user_keyed(
    entries: &mut serde_json::Map<String, Value>,
    personal: bool,
    sealing: &mut Sealing<'_>,
) -> Result<(), SealError> {
    let sealed_before = |name: &str, entry: &Value| {
        is_sealed_name(name)
            && entry
                .as_str()
                .is_some_and(|text| text.starts_with(SEALED_PREFIX))
    };
    if let Sealing::Open { key: None, .. } = sealing {
        entries.retain(|name, entry| personal || !sealed_before(name, entry));
    }
    for (name, entry) in entries.iter_mut() {
        let opened_as_before =
            matches!(sealing, Sealing::Open { .. }) && sealed_before(name, entry);
        visit_personal_strings(entry, personal || opened_as_before, sealing)?;
    }
    Ok(())
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
    fn a_client_named_like_a_personal_field_is_neither_sealed_nor_erased() {
        let key = DataKey::generate();
        let original = json!({"ClientRestrictionsChanged": {
            "from": {"default": "allow", "clients": {}},
            "to": {"default": "allow", "clients": {"email": "block", "api_key": "allow"}}
        }});
        let mut sealed = original.clone();
        seal_personal_data(&mut sealed, &key, b"org-1");
        assert_eq!(sealed, original, "nothing personal in it");
        open_personal_data(&mut sealed, None, b"org-1").unwrap();
        assert_eq!(sealed, original, "nothing to erase either");
    }

    #[test]
    fn a_client_entry_sealed_by_an_earlier_version_opens_or_goes() {
        let key = DataKey::generate();
        let stored = || {
            json!({"ClientRestrictionsChanged": {"to": {"default": "allow", "clients": {
                "email": key.seal_str("block", b"org-1"),
                "web": "allow"
            }}}})
        };
        let mut opened = stored();
        open_personal_data(&mut opened, Some(&key), b"org-1").unwrap();
        assert_eq!(
            opened["ClientRestrictionsChanged"]["to"]["clients"],
            json!({"email": "block", "web": "allow"})
        );
        let mut erased = stored();
        open_personal_data(&mut erased, None, b"org-1").unwrap();
        assert_eq!(
            erased["ClientRestrictionsChanged"]["to"]["clients"],
            json!({"web": "allow"}),
            "an erased entry would not decode: it is dropped"
        );
    }

    /// Whatever the `chacha20poly1305` crate sealed (every sealed value stored before this
    /// code) opens here, and what this code seals opens there: the same cipher, byte for byte.
    #[test]
    fn sealing_is_interchangeable_with_the_chacha20poly1305_crate() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        use chacha20poly1305::{XChaCha20Poly1305, XNonce};
        let key = DataKey::generate();
        let reference = XChaCha20Poly1305::new(key.as_bytes().into());
        let aad = b"0193f4a2-7b1c-7d3e-9f00-123456789abc";
        for length in [0, 1, 15, 16, 17, 63, 64, 65, 255, 256, 1_000, 70_000] {
            let plaintext: Vec<u8> = (0..length).map(|i| (i * 7 % 251) as u8).collect();

            let sealed = key.encrypt(&plaintext, aad);
            assert_eq!(sealed.len(), NONCE_LEN + length + 16);
            let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
            let opened = reference
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ciphertext,
                        aad,
                    },
                )
                .expect("the crate opens what this code sealed");
            assert_eq!(opened, plaintext);

            let nonce: [u8; NONCE_LEN] = std::array::from_fn(|i| (i * 31 + length) as u8);
            let mut theirs = nonce.to_vec();
            theirs.extend(
                reference
                    .encrypt(
                        XNonce::from_slice(&nonce),
                        Payload {
                            msg: &plaintext,
                            aad,
                        },
                    )
                    .unwrap(),
            );
            assert_eq!(key.decrypt(&theirs, aad).unwrap(), plaintext);
            let mut tampered = theirs.clone();
            *tampered.last_mut().unwrap() ^= 1;
            assert!(matches!(
                key.decrypt(&tampered, aad),
                Err(SealError::Authentication)
            ));
        }
        assert!(matches!(
            key.decrypt(&[0; NONCE_LEN - 1], aad),
            Err(SealError::Malformed)
        ));
        assert!(matches!(
            key.decrypt(&[0; NONCE_LEN + 15], aad),
            Err(SealError::Authentication)
        ));
    }

    /// draft-irtf-cfrg-xchacha-03, appendix A.3.1.
    #[test]
    fn the_drafts_test_vector_seals_and_opens() {
        let decode = |text: &str| hex::decode(text).unwrap();
        let key = DataKey::from_bytes(&decode(
            "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
        ))
        .unwrap();
        let nonce: [u8; NONCE_LEN] = decode("404142434445464748494a4b4c4d4e4f5051525354555657")
            .try_into()
            .unwrap();
        let aad = decode("50515253c0c1c2c3c4c5c6c7");
        let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let mut expected = nonce.to_vec();
        expected.extend(decode(concat!(
            "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb",
            "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452",
            "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9",
            "21f9664c97637da9768812f615c68b13b52e",
            "c0875924c1c7987947deafd8780acf49",
        )));
        assert_eq!(key.encrypt_with(&nonce, plaintext, &aad), expected);
        assert_eq!(key.decrypt(&expected, &aad).unwrap(), plaintext);
    }

    #[test]
    fn nonces_are_random() {
        let key = DataKey::generate();
        let nonces: std::collections::HashSet<Vec<u8>> = (0..1_000)
            .map(|_| key.encrypt(b"mia@example.com", b"org-1")[..NONCE_LEN].to_vec())
            .collect();
        assert_eq!(nonces.len(), 1_000);
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
