//! A parsed JSON body read as a request's type, strictly: a struct only from an object.
//!
//! serde_json reads a struct from an array too, field by field in order (serde-rs/serde#1587,
//! kept for compatibility), so `["Acme", null, null, null]` would create an organization
//! named Acme. The contract calls a body of the wrong shape `422 validation_failed`; this
//! deserializer refuses an array wherever a struct is wanted, at any depth, and is otherwise
//! serde_json's reading of a `Value`.

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Unexpected, Visitor};
use serde::forward_to_deserialize_any;
use serde_json::{Error, Value};

/// `value`, to be deserialized strictly.
pub struct Strict<'de>(pub &'de Value);

impl<'de> de::Deserializer<'de> for Strict<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(value) => visitor.visit_bool(*value),
            Value::Number(number) => {
                if let Some(value) = number.as_u64() {
                    visitor.visit_u64(value)
                } else if let Some(value) = number.as_i64() {
                    visitor.visit_i64(value)
                } else {
                    visitor.visit_f64(number.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(text) => visitor.visit_borrowed_str(text),
            Value::Array(items) => {
                let mut elements = Elements(items.iter());
                let value = visitor.visit_seq(&mut elements)?;
                match elements.0.len() {
                    0 => Ok(value),
                    _ => Err(de::Error::invalid_length(items.len(), &"fewer elements")),
                }
            }
            Value::Object(fields) => visitor.visit_map(Fields {
                fields: fields.iter(),
                value: None,
            }),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    /// Enums as serde_json reads them: the request types' enums are names (strings).
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_enum(self.0, name, variants, visitor)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

fn unexpected(value: &Value) -> Unexpected<'_> {
    match value {
        Value::Null => Unexpected::Unit,
        Value::Bool(value) => Unexpected::Bool(*value),
        Value::Number(number) => match (number.as_u64(), number.as_i64()) {
            (Some(value), _) => Unexpected::Unsigned(value),
            (None, Some(value)) => Unexpected::Signed(value),
            (None, None) => Unexpected::Float(number.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(text) => Unexpected::Str(text),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

struct Elements<'de>(std::slice::Iter<'de, Value>);

impl<'de> SeqAccess<'de> for Elements<'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.0
            .next()
            .map(|item| seed.deserialize(Strict(item)))
            .transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Fields<'de> {
    fields: serde_json::map::Iter<'de>,
    value: Option<&'de Value>,
}

impl<'de> MapAccess<'de> for Fields<'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, value)) = self.fields.next() else {
            return Ok(None);
        };
        self.value = Some(value);
        seed.deserialize(BorrowedStrDeserializer::new(key))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let value = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("a value asked for before its key"))?;
        seed.deserialize(Strict(value))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.fields.len())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::Strict;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Owner {
        user_id: String,
        email: Option<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Create {
        name: String,
        seats: Option<u32>,
        scopes: Option<Vec<String>>,
        owner: Option<Owner>,
        kind: Option<Kind>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Kind {
        Team,
        Personal,
    }

    fn read(json: &str) -> Result<Create, String> {
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        serde_path_to_error::deserialize(Strict(&value))
            .map_err(|error| format!("{}: {}", error.path(), error.inner()))
    }

    #[test]
    fn objects_read_as_serde_json_reads_them() {
        let read = read(
            r#"{"name": "Acme", "seats": 5, "scopes": ["members:read"],
                "owner": {"user_id": "u1", "email": null}, "kind": "team"}"#,
        );
        assert_eq!(
            read.unwrap(),
            Create {
                name: "Acme".into(),
                seats: Some(5),
                scopes: Some(vec!["members:read".into()]),
                owner: Some(Owner {
                    user_id: "u1".into(),
                    email: None
                }),
                kind: Some(Kind::Team),
            }
        );
    }

    #[test]
    fn a_struct_is_never_read_from_an_array_at_any_depth() {
        let whole = read(r#"["Acme", null, null, null, null]"#).unwrap_err();
        assert!(whole.contains("invalid type: sequence"), "{whole}");
        let nested = read(r#"{"name": "Acme", "owner": ["u1", null]}"#).unwrap_err();
        assert!(
            nested.starts_with("owner: invalid type: sequence"),
            "{nested}"
        );
        assert!(serde_json::from_str::<Create>(r#"["Acme", null, null, null, null]"#).is_ok());
    }

    #[test]
    fn shape_errors_name_their_field_as_before() {
        for (json, expected) in [
            (r#"{"name": 5}"#, "name: invalid type: integer `5`, expected a string"),
            (r#"{"name": "A", "seats": -1}"#, "seats: invalid value: integer `-1`, expected u32"),
            (r#"{"name": "A", "seats": 5000000000}"#, "seats: invalid value: integer `5000000000`, expected u32"),
            (r#"{"name": "A", "seats": 1.5}"#, "seats: invalid type: floating point `1.5`, expected u32"),
            (r#"{"name": "A", "kind": "other"}"#, "kind: unknown variant `other`, expected `team` or `personal`"),
            (r#"{"name": "A", "color": "red"}"#, "color: unknown field `color`, expected one of `name`, `seats`, `scopes`, `owner`, `kind`"),
            (r#"{"seats": 1}"#, ".: missing field `name`"),
        ] {
            assert_eq!(read(json).unwrap_err(), expected, "{json}");
        }
    }
}
