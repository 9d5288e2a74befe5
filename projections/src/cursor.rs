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

    pub fn decode(raw: &str) -> Result<Self, CursorError> {
        let bytes = BASE64URL.decode(raw).map_err(|_| CursorError)?;
        serde_json::from_slice(&bytes)
            .map(Self)
            .map_err(|_| CursorError)
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

/// A `LIKE` pattern matching `needle` anywhere, case-insensitively, with `\` as escape.
pub(crate) fn contains_pattern(needle: &str) -> String {
    let mut pattern = String::with_capacity(needle.len() + 2);
    pattern.push('%');
    for c in needle.to_lowercase().chars() {
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
    fn like_patterns_escape_wildcards() {
        assert_eq!(contains_pattern("A_b%"), "%a\\_b\\%%");
    }
}
