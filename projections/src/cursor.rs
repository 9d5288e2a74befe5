//! Opaque cursors for keyset pagination: stable while rows are inserted concurrently.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A page of a list, with the cursor of the next page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the cursor is not one this list issued")]
pub struct CursorError;

/// The list that issues a cursor, and whose it is: an organization's lists name the
/// organization, a user's organizations the user. A cursor names its list and is taken back
/// by that list only: another list's cursor, or the same list's of another organization,
/// would decode to a key of the same shape and silently start the page at an unrelated place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List<'a> {
    Organizations,
    UserOrganizations(&'a str),
    Members(&'a str),
    Invitations(&'a str),
    AuditLog(&'a str),
    Groups(&'a str),
    ServiceAccounts(&'a str),
    AiProviders(&'a str),
    Roles(&'a str),
}

impl List<'_> {
    fn tag(self) -> &'static str {
        match self {
            Self::Organizations => "organizations",
            Self::UserOrganizations(_) => "user_organizations",
            Self::Members(_) => "members",
            Self::Invitations(_) => "invitations",
            Self::AuditLog(_) => "audit_log",
            Self::Groups(_) => "groups",
            Self::ServiceAccounts(_) => "service_accounts",
            Self::AiProviders(_) => "ai_providers",
            Self::Roles(_) => "roles",
        }
    }

    fn whose(&self) -> Option<&str> {
        match *self {
            Self::Organizations => None,
            Self::UserOrganizations(id)
            | Self::Members(id)
            | Self::Invitations(id)
            | Self::AuditLog(id)
            | Self::Groups(id)
            | Self::ServiceAccounts(id)
            | Self::AiProviders(id)
            | Self::Roles(id) => Some(id),
        }
    }
}

/// The sort key of the last row of a page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor<K>(pub K);

impl<K: Serialize + DeserializeOwned> Cursor<K> {
    /// `[list, key]`, or `[list, key, whose]`, as JSON in URL-safe base64.
    pub fn encode(&self, list: List<'_>) -> String {
        let json = match list.whose() {
            Some(whose) => serde_json::to_vec(&(list.tag(), &self.0, whose)),
            None => serde_json::to_vec(&(list.tag(), &self.0)),
        }
        .expect("cursor keys serialize");
        BASE64URL.encode(json)
    }

    /// Refuses what `list` does not issue: another list's cursor, another organization's
    /// (or user's), garbage, and strings with a NUL, which PostgreSQL cannot compare with
    /// text and would answer with an error. Cursors issued before they named whose list
    /// they page are taken without it, and bare keys too (cursors were issued without their
    /// list's name until 2026-12-03): a client paging through an upgrade keeps its place.
    /// No bare key was a pair or triple led by text (they were a number, a text, or a
    /// number and a text), so such a pair is `[list, key]` and such a triple
    /// `[list, key, whose]`.
    pub fn decode(raw: &str, list: List<'_>) -> Result<Self, CursorError> {
        let bytes = BASE64URL.decode(raw).map_err(|_| CursorError)?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| CursorError)?;
        if holds_nul(&value) {
            return Err(CursorError);
        }
        let key = match value {
            serde_json::Value::Array(mut parts)
                if (parts.len() == 2 || parts.len() == 3) && parts[0].is_string() =>
            {
                if parts[0] != list.tag() {
                    return Err(CursorError);
                }
                if parts.len() == 3 {
                    let whose = parts.pop().expect("three parts");
                    if whose.as_str() != list.whose() {
                        return Err(CursorError);
                    }
                }
                parts.pop().expect("two parts")
            }
            bare => bare,
        };
        serde_json::from_value(key)
            .map(Self)
            .map_err(|_| CursorError)
    }
}

fn holds_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(text) => text.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(holds_nul),
        serde_json::Value::Object(fields) => fields
            .iter()
            .any(|(name, value)| name.contains('\0') || holds_nul(value)),
        _ => false,
    }
}

/// Cuts a `limit + 1` fetch into a page: the extra row only says another page exists.
pub(crate) fn paginate<T, K: Serialize + DeserializeOwned>(
    mut rows: Vec<T>,
    limit: usize,
    list: List<'_>,
    key: impl Fn(&T) -> K,
) -> Page<T> {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = if more {
        rows.last().map(|last| Cursor(key(last)).encode(list))
    } else {
        None
    };
    Page {
        items: rows,
        next_cursor,
    }
}

/// Pages a short list read whole (an organization's groups, service accounts, AI providers
/// or roles) with the same keyset cursors as the long lists: sorted by `key`, the page after
/// `cursor`'s key, at most `limit` items.
pub fn page_of<T, K>(
    mut items: Vec<T>,
    limit: usize,
    list: List<'_>,
    cursor: Option<&str>,
    key: impl Fn(&T) -> K,
) -> Result<Page<T>, CursorError>
where
    K: Ord + Serialize + DeserializeOwned,
{
    let after = cursor
        .map(|raw| Cursor::<K>::decode(raw, list))
        .transpose()?;
    items.sort_by_key(|item| key(item));
    if let Some(Cursor(after)) = after {
        items.retain(|item| key(item) > after);
    }
    items.truncate(limit + 1);
    Ok(paginate(items, limit, list, key))
}

/// Text as searches compare it: lower-cased by Unicode's rules. Read models keep a folded
/// copy of what `q` searches, because SQLite's `lower()` and `LIKE` fold ASCII letters only
/// (`É` stays `É`) where PostgreSQL's fold them all: both stores then match alike.
pub fn fold(text: &str) -> String {
    text.to_lowercase()
}

/// A `LIKE` pattern matching `needle` anywhere, case-insensitively (against folded text),
/// with `\` as escape.
pub(crate) fn contains_pattern(needle: &str) -> String {
    let mut pattern = String::with_capacity(needle.len() + 2);
    pattern.push('%');
    push_literal(&mut pattern, &fold(needle));
    pattern.push('%');
    pattern
}

/// A `LIKE ... ESCAPE '\'` pattern for what begins with `prefix`, taken literally.
pub(crate) fn prefix_pattern(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    push_literal(&mut pattern, prefix);
    pattern.push('%');
    pattern
}

/// `text` into a `LIKE ... ESCAPE '\'` pattern as itself: its wildcards and the escape
/// character escaped.
fn push_literal(pattern: &mut String, text: &str) {
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_pattern_takes_wildcards_and_the_escape_literally() {
        assert_eq!(prefix_pattern("member."), "member.%");
        assert_eq!(prefix_pattern("a\\b_c%"), "a\\\\b\\_c\\%%");
        assert_eq!(contains_pattern("A\\b"), "%a\\\\b%");
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = Cursor((17_i64, "mia".to_owned()));
        assert_eq!(
            Cursor::<(i64, String)>::decode(
                &cursor.encode(List::Members("acme")),
                List::Members("acme")
            ),
            Ok(cursor)
        );
        assert_eq!(
            Cursor::<(i64, String)>::decode("!!", List::Members("acme")),
            Err(CursorError)
        );
        assert_eq!(
            Cursor::<(i64, String)>::decode("bm90IGpzb24", List::Members("acme")),
            Err(CursorError)
        );
    }

    #[test]
    fn a_cursor_with_a_nul_in_a_string_is_refused() {
        let forged = Cursor((17_i64, "a\0b".to_owned())).encode(List::Members("acme"));
        assert_eq!(
            Cursor::<(i64, String)>::decode(&forged, List::Members("acme")),
            Err(CursorError)
        );
        let backslash_text = Cursor((17_i64, "a\\u0000b".to_owned()));
        assert_eq!(
            Cursor::<(i64, String)>::decode(
                &backslash_text.encode(List::Members("acme")),
                List::Members("acme")
            ),
            Ok(backslash_text)
        );
    }

    #[test]
    fn a_short_list_is_paged_by_its_key_and_its_cursors() {
        let first = page_of(vec![3, 1, 4, 5, 2], 2, List::Groups("acme"), None, |n| *n).unwrap();
        assert_eq!(first.items, [1, 2]);
        let second = page_of(
            vec![3, 1, 4, 5, 2],
            2,
            List::Groups("acme"),
            first.next_cursor.as_deref(),
            |n| *n,
        )
        .unwrap();
        assert_eq!(second.items, [3, 4]);
        // An item inserted before the cursor does not shift the next page.
        let third = page_of(
            vec![0, 3, 1, 4, 5, 2],
            2,
            List::Groups("acme"),
            second.next_cursor.as_deref(),
            |n| *n,
        )
        .unwrap();
        assert_eq!((third.items, third.next_cursor), (vec![5], None));
        assert_eq!(
            page_of(vec![1], 2, List::Groups("acme"), Some("garbage"), |n| *n),
            Err(CursorError)
        );
    }

    #[test]
    fn a_cursor_is_taken_back_only_for_the_organization_it_pages() {
        let acme = Cursor(42_i64).encode(List::AuditLog("acme"));
        assert_eq!(
            Cursor::<i64>::decode(&acme, List::AuditLog("acme")),
            Ok(Cursor(42))
        );
        assert_eq!(
            Cursor::<i64>::decode(&acme, List::AuditLog("globex")),
            Err(CursorError)
        );
        let mia = Cursor((17_i64, "acme".to_owned())).encode(List::UserOrganizations("mia"));
        assert_eq!(
            Cursor::<(i64, String)>::decode(&mia, List::UserOrganizations("nina")),
            Err(CursorError)
        );
        // Issued before cursors named their organization: still taken, as bare keys are.
        let before = BASE64URL.encode(br#"["audit_log",42]"#);
        assert_eq!(
            Cursor::<i64>::decode(&before, List::AuditLog("globex")),
            Ok(Cursor(42))
        );
        // The organizations list is nobody's: its cursors name none.
        let organizations = Cursor((1_i64, "x".to_owned())).encode(List::Organizations);
        assert_eq!(
            BASE64URL.decode(&organizations).unwrap(),
            br#"["organizations",[1,"x"]]"#
        );
    }

    #[test]
    fn a_cursor_is_taken_back_only_by_the_list_that_issued_it() {
        let members = Cursor((17_i64, "mia".to_owned())).encode(List::Members("acme"));
        assert_eq!(
            Cursor::<(i64, String)>::decode(&members, List::Invitations("acme")),
            Err(CursorError)
        );
        assert_eq!(
            Cursor::<(i64, String)>::decode(&members, List::UserOrganizations("acme")),
            Err(CursorError)
        );
        let audit = Cursor(42_i64).encode(List::AuditLog("acme"));
        assert_eq!(
            Cursor::<i64>::decode(&audit, List::AuditLog("acme")),
            Ok(Cursor(42))
        );
        assert_eq!(
            Cursor::<i64>::decode(&audit, List::Groups("acme")),
            Err(CursorError)
        );
    }

    #[test]
    fn a_bare_key_issued_before_cursors_named_their_list_still_pages() {
        let bare = |json: &str| BASE64URL.encode(json);
        assert_eq!(
            Cursor::<(i64, String)>::decode(&bare(r#"[17,"mia"]"#), List::Members("acme")),
            Ok(Cursor((17, "mia".to_owned())))
        );
        assert_eq!(
            Cursor::<i64>::decode(&bare("42"), List::AuditLog("acme")),
            Ok(Cursor(42))
        );
    }

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(contains_pattern("A_b%"), "%a\\_b\\%%");
    }
}
