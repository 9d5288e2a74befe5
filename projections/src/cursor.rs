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

/// The sort key of the last row of a page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor<K>(pub K);

impl<K: Serialize + DeserializeOwned> Cursor<K> {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(&self.0).expect("cursor keys serialize");
        BASE64URL.encode(json)
    }

    /// Refuses what no list issues, including strings with a NUL, which PostgreSQL cannot
    /// compare with text and would answer with an error.
    pub fn decode(raw: &str) -> Result<Self, CursorError> {
        let bytes = BASE64URL.decode(raw).map_err(|_| CursorError)?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| CursorError)?;
        if holds_nul(&value) {
            return Err(CursorError);
        }
        serde_json::from_value(value)
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
    key: impl Fn(&T) -> K,
) -> Page<T> {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = if more {
        rows.last().map(|last| Cursor(key(last)).encode())
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
    cursor: Option<&str>,
    key: impl Fn(&T) -> K,
) -> Result<Page<T>, CursorError>
where
    K: Ord + Serialize + DeserializeOwned,
{
    let after = cursor.map(Cursor::<K>::decode).transpose()?;
    items.sort_by_key(|item| key(item));
    if let Some(Cursor(after)) = after {
        items.retain(|item| key(item) > after);
    }
    items.truncate(limit + 1);
    Ok(paginate(items, limit, key))
}

/// Text as searches compare it: lower-cased by Unicode's rules. Read models keep a folded
/// copy of what `q` searches, because SQLite's `lower()` and `LIKE` fold ASCII letters only
/// (`É` stays `É`) where PostgreSQL's fold them all: both stores then match alike.
pub(crate) fn fold(text: &str) -> String {
    text.to_lowercase()
}

/// A `LIKE` pattern matching `needle` anywhere, case-insensitively (against folded text),
/// with `\` as escape.
pub(crate) fn contains_pattern(needle: &str) -> String {
    let mut pattern = String::with_capacity(needle.len() + 2);
    pattern.push('%');
    for c in fold(needle).chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = Cursor((17_i64, "mia".to_owned()));
        assert_eq!(
            Cursor::<(i64, String)>::decode(&cursor.encode()).unwrap(),
            cursor
        );
        assert_eq!(Cursor::<(i64, String)>::decode("!!"), Err(CursorError));
        assert_eq!(
            Cursor::<(i64, String)>::decode("bm90IGpzb24"),
            Err(CursorError)
        );
    }

    #[test]
    fn a_cursor_with_a_nul_in_a_string_is_refused() {
        let forged = Cursor((17_i64, "a\0b".to_owned())).encode();
        assert_eq!(Cursor::<(i64, String)>::decode(&forged), Err(CursorError));
        let backslash_text = Cursor((17_i64, "a\\u0000b".to_owned()));
        assert_eq!(
            Cursor::<(i64, String)>::decode(&backslash_text.encode()),
            Ok(backslash_text)
        );
    }

    #[test]
    fn a_short_list_is_paged_by_its_key_and_its_cursors() {
        let first = page_of(vec![3, 1, 4, 5, 2], 2, None, |n| *n).unwrap();
        assert_eq!(first.items, [1, 2]);
        let second = page_of(vec![3, 1, 4, 5, 2], 2, first.next_cursor.as_deref(), |n| *n).unwrap();
        assert_eq!(second.items, [3, 4]);
        // An item inserted before the cursor does not shift the next page.
        let third = page_of(
            vec![0, 3, 1, 4, 5, 2],
            2,
            second.next_cursor.as_deref(),
            |n| *n,
        )
        .unwrap();
        assert_eq!((third.items, third.next_cursor), (vec![5], None));
        assert_eq!(
            page_of(vec![1], 2, Some("garbage"), |n| *n),
            Err(CursorError)
        );
    }

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(contains_pattern("A_b%"), "%a\\_b\\%%");
    }
}
