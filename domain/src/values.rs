//! Validated values. Commands carry these, so a command that exists is well-formed; events
//! store plain strings because personal data in them may later read as [`crate::ERASED`].

use serde::{Deserialize, Serialize};

use crate::error::{FieldError, OrganizationError};

/// An email address, trimmed and lower-cased: emails compare case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldError> {
        let email = raw.trim().to_lowercase();
        let invalid = |message: &str| FieldError::new(field, message);
        if email.is_empty() || email.len() > 254 {
            return Err(invalid("must be an email address of 1 to 254 characters"));
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(invalid("must be an email address such as ada@example.com"));
        };
        let well_formed = !local.is_empty()
            && local.len() <= 64
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && email
                .chars()
                .all(|c| !c.is_whitespace() && !is_hidden_control(c));
        if !well_formed {
            return Err(invalid("must be an email address such as ada@example.com"));
        }
        Ok(Self(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A control character, or one that reorders the text around it when shown (the Unicode
/// embeddings, overrides and isolates): "Acme\u{202E}moc.live" shows as "Acmeevil.com"
/// ("Trojan Source"). The direction marks (U+200E, U+200F, U+061C), which mixed-direction
/// names use and which move no letters, are not among them.
pub(crate) fn is_hidden_control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Refuses a new value that reorders the text around it when shown, for values whose parse
/// cannot refuse it because values already held are parsed alike (user ids, organization
/// names): judged only as they enter.
pub(crate) fn refuse_reordering(field: &str, value: &str) -> Result<(), OrganizationError> {
    if value.chars().any(is_hidden_control) {
        return Err(OrganizationError::validation(
            field,
            "must not hold a text-direction override or isolate (U+202A to U+202E, U+2066 to \
             U+2069): it would show as other text",
        ));
    }
    Ok(())
}

/// A user id: opaque, chosen by the caller, 1 to 128 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldError> {
        let length = raw.chars().count();
        if !(1..=128).contains(&length) || raw.chars().any(char::is_control) {
            return Err(FieldError::new(
                field,
                "must be 1 to 128 characters with no control characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// A user id someone acts under (an `X-Actor-Id`, an organization's first owner, a
    /// member joining): also without a space at either end, which HTTP strips from an
    /// `X-Actor-Id` header, so such a user could never act. Ids already held are looked up
    /// with [`UserId::parse`].
    pub fn parse_for_actor(field: &str, raw: &str) -> Result<Self, FieldError> {
        let id = Self::parse(field, raw)?;
        if raw.starts_with(' ') || raw.ends_with(' ') {
            return Err(FieldError::new(
                field,
                "must not begin or end with a space (an X-Actor-Id header cannot carry it)",
            ));
        }
        Ok(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An organization's display name: 1 to 200 characters after trimming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct OrganizationName(String);

impl OrganizationName {
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldError> {
        let name = raw.trim();
        let length = name.chars().count();
        if !(1..=200).contains(&length) || name.chars().any(char::is_control) {
            return Err(FieldError::new(
                field,
                "must be 1 to 200 characters with no control characters",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A URL-safe identifier: `^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Slug(String);

impl Slug {
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldError> {
        let bytes = raw.as_bytes();
        let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let valid = (3..=63).contains(&bytes.len())
            && edge_ok(bytes[0])
            && edge_ok(bytes[bytes.len() - 1])
            && bytes.iter().all(|&b| edge_ok(b) || b == b'-');
        if !valid {
            return Err(FieldError::new(
                field,
                "must be 3 to 63 lower-case letters, digits or hyphens, starting and ending with a letter or digit",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Derives a slug from a name: lower-case ASCII letters and digits, other runs become one
    /// hyphen. Names with too few of those fall back to `org-<suffix>`.
    pub fn derive(name: &str, fallback_suffix: &str) -> Self {
        let mut slug = String::with_capacity(name.len());
        for c in name.chars().flat_map(char::to_lowercase) {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                slug.push(c);
            } else if !slug.is_empty() && !slug.ends_with('-') {
                slug.push('-');
            }
        }
        slug.truncate(63);
        let slug = slug.trim_end_matches('-');
        Self::parse("slug", slug).unwrap_or_else(|_| {
            let fallback: String = format!("org-{fallback_suffix}")
                .chars()
                .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .take(63)
                .collect();
            Self(fallback)
        })
    }

    /// The slug with a numeric suffix, still within 63 characters: `acme` → `acme-2`.
    pub fn with_suffix(&self, n: u32) -> Self {
        let suffix = format!("-{n}");
        let mut base = self.0.clone();
        base.truncate(63 - suffix.len());
        let base = base.trim_end_matches('-');
        Self(format!("{base}{suffix}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An invitation lifetime in days, 1 to 90.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ExpiryDays(u16);

impl ExpiryDays {
    pub const DEFAULT: Self = Self(7);

    pub fn new(field: &str, days: i64) -> Result<Self, FieldError> {
        if !(1..=90).contains(&days) {
            return Err(FieldError::new(field, "must be between 1 and 90 days"));
        }
        Ok(Self(days as u16))
    }

    pub fn days(self) -> u16 {
        self.0
    }
}

/// How many times a shareable link invitation may be accepted, 1 to 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MaxUses(u32);

impl MaxUses {
    pub const ONE: Self = Self(1);

    pub fn new(field: &str, uses: i64) -> Result<Self, FieldError> {
        if !(1..=1000).contains(&uses) {
            return Err(FieldError::new(field, "must be between 1 and 1000"));
        }
        Ok(Self(uses as u32))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// A member profile field that an admin can lock against self-service edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockedField {
    FirstName,
    LastName,
    Title,
}

impl LockedField {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FirstName => "first_name",
            Self::LastName => "last_name",
            Self::Title => "title",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        let email = Email::parse("email", "  Ada@Example.COM ").unwrap();
        assert_eq!(email.as_str(), "ada@example.com");
    }

    #[test]
    fn malformed_emails_are_rejected_with_their_field() {
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "ada@@x.io",
            "ev\u{202E}li@example.com",
            "ada@exa\u{2066}mple.com",
        ] {
            let error = Email::parse("email", bad).unwrap_err();
            assert_eq!(error.field, "email", "{bad}");
        }
    }

    #[test]
    fn a_user_id_to_act_under_has_no_space_at_its_ends() {
        for bad in [" lead", "lead ", " ", "  "] {
            let error = UserId::parse_for_actor("owner.user_id", bad).unwrap_err();
            assert_eq!(error.field, "owner.user_id", "{bad:?}");
            assert!(
                UserId::parse("user_id", bad).is_ok(),
                "{bad:?} is still looked up"
            );
        }
        for good in ["lead", "ada lovelace", "ü", &"x".repeat(128)] {
            assert!(UserId::parse_for_actor("user_id", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn overrides_and_isolates_are_hidden_controls_and_direction_marks_are_not() {
        for hidden in [
            '\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}', '\u{0}', '\n',
        ] {
            assert!(is_hidden_control(hidden), "{hidden:?}");
        }
        for shown in [
            '\u{200E}', '\u{200F}', '\u{061C}', 'a', 'ש', '\u{2065}', '\u{202F}',
        ] {
            assert!(!is_hidden_control(shown), "{shown:?}");
        }
    }

    #[test]
    fn slugs_follow_the_contract_pattern() {
        for good in ["acme", "a-1", "abc", &"a".repeat(63)] {
            assert!(Slug::parse("slug", good).is_ok(), "{good}");
        }
        for bad in ["ab", "-abc", "abc-", "ABC", "a_b", "", &"a".repeat(64)] {
            assert!(Slug::parse("slug", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn slugs_derive_from_names() {
        assert_eq!(Slug::derive("Acme Corp!", "x").as_str(), "acme-corp");
        assert_eq!(Slug::derive("  Ünïcode & Co ", "x").as_str(), "n-code-co");
        assert_eq!(Slug::derive("日本", "0190abcd").as_str(), "org-0190abcd");
        assert_eq!(Slug::derive("A", "1234").as_str(), "org-1234");
        let long = Slug::derive(&"x".repeat(100), "1");
        assert_eq!(long.as_str().len(), 63);
        assert_eq!(
            Slug::parse("slug", "acme").unwrap().with_suffix(2).as_str(),
            "acme-2"
        );
        let suffixed = Slug::parse("slug", &"a".repeat(63))
            .unwrap()
            .with_suffix(12);
        assert!(Slug::parse("slug", suffixed.as_str()).is_ok());
    }

    #[test]
    fn expiry_and_max_uses_have_bounds() {
        assert!(ExpiryDays::new("expires_in_days", 0).is_err());
        assert!(ExpiryDays::new("expires_in_days", 91).is_err());
        assert_eq!(ExpiryDays::new("expires_in_days", 1).unwrap().days(), 1);
        assert_eq!(ExpiryDays::new("expires_in_days", 90).unwrap().days(), 90);
        assert!(MaxUses::new("max_uses", 0).is_err());
        assert!(MaxUses::new("max_uses", 1001).is_err());
        assert_eq!(MaxUses::new("max_uses", 1).unwrap(), MaxUses::ONE);
        assert_eq!(MaxUses::new("max_uses", 1000).unwrap().get(), 1000);
    }

    #[test]
    fn user_ids_are_one_to_128_characters() {
        assert!(UserId::parse("user_id", "").is_err());
        assert!(UserId::parse("user_id", &"u".repeat(129)).is_err());
        assert!(UserId::parse("user_id", "u\n").is_err());
        assert!(UserId::parse("user_id", "user_1").is_ok());
    }
}

/// A secret a command carries into an event (an AI provider's API key): sealed when stored
/// (`SECRET_FIELDS`), and never printed: `Debug` shows its length alone. Serialized as the
/// bare string, so stored events keep their shape.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Self {
        Self(secret)
    }
}

impl From<&str> for Secret {
    fn from(secret: &str) -> Self {
        Self(secret.to_owned())
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(secret: &str) -> Result<Self, Self::Err> {
        Ok(Self::from(secret))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} characters)", self.0.chars().count())
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn a_secret_is_never_printed_and_serializes_bare() {
        let secret = Secret::from("sk-live-123456");
        assert_eq!(format!("{secret:?}"), "Secret(14 characters)");
        assert_eq!(
            serde_json::to_string(&secret).unwrap(),
            "\"sk-live-123456\""
        );
        let back: Secret = serde_json::from_str("\"sk-live-123456\"").unwrap();
        assert_eq!(back, secret);
    }
}
