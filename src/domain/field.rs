//! Lenient JSON fields. A client that sends `"latitude": "north"` and `"status": 3` should hear about
//! both fields in one 422 answer, not about the first one serde trips over. These types accept any JSON
//! value in one pass and remember whether it had the expected type, so validation can name every bad
//! field.

use compact_str::CompactString;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;

/// A field as it arrived: absent (or `null`), a value of the expected type, or a value of another type.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Field<T> {
    #[default]
    Missing,
    Value(T),
    /// The JSON type that arrived instead, e.g. "a string".
    WrongType(&'static str),
}

/// A JSON number field.
pub type NumberField = Field<f64>;
/// A JSON string field; strings up to 24 bytes stay inline without allocating.
pub type TextField = Field<CompactString>;

/// How one JSON kind maps onto `T`: every method but the expected one reports a type mismatch.
trait FromJson: Sized {
    fn from_number(_v: f64) -> Option<Self> {
        None
    }
    fn from_text(_v: &str) -> Option<Self> {
        None
    }
}

impl FromJson for f64 {
    fn from_number(v: f64) -> Option<Self> {
        Some(v)
    }
}

impl FromJson for CompactString {
    fn from_text(v: &str) -> Option<Self> {
        Some(CompactString::new(v))
    }
}

struct FieldVisitor<T>(PhantomData<T>);

impl<T: FromJson> FieldVisitor<T> {
    fn number(v: f64) -> Field<T> {
        T::from_number(v).map_or(Field::WrongType("a number"), Field::Value)
    }
}

impl<'de, T: FromJson> Visitor<'de> for FieldVisitor<T> {
    type Value = Field<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Missing)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Missing)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Field::WrongType("a boolean"))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Self::number(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Self::number(v as f64))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Self::number(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(T::from_text(v).map_or(Field::WrongType("a string"), Field::Value))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::WrongType("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::WrongType("an object"))
    }
}

impl<'de> Deserialize<'de> for NumberField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor(PhantomData))
    }
}

impl<'de> Deserialize<'de> for TextField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor(PhantomData))
    }
}

/// Used by batch decoding: an element that is not a JSON object is reported at its index instead of
/// failing the whole batch.
pub(crate) fn deserialize_object_or_kind<'de, D, T>(
    d: D,
) -> Result<Result<T, &'static str>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectVisitor<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
        type Value = Result<T, &'static str>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Ok)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Err("null"))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Err("a boolean"))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Err("a number"))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Err("a number"))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Err("a number"))
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Err("a string"))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Err("an array"))
        }
    }
    d.deserialize_any(ObjectVisitor(PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        n: NumberField,
        #[serde(default)]
        s: TextField,
    }

    fn probe(json: &str) -> Probe {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn accepts_expected_types() {
        let p = probe(r#"{"n": 1.5, "s": "abc"}"#);
        assert_eq!(p.n, Field::Value(1.5));
        assert_eq!(p.s, Field::Value(CompactString::new("abc")));
        assert_eq!(probe(r#"{"n": -3}"#).n, Field::Value(-3.0));
    }

    #[test]
    fn missing_and_null_are_missing() {
        let p = probe("{}");
        assert_eq!(p.n, Field::Missing);
        assert_eq!(probe(r#"{"n": null, "s": null}"#).s, Field::Missing);
    }

    #[test]
    fn wrong_types_are_named_not_fatal() {
        let p = probe(r#"{"n": "1.5", "s": {"a": [1, {"b": 2}]}}"#);
        assert_eq!(p.n, Field::WrongType("a string"));
        assert_eq!(p.s, Field::WrongType("an object"));
        let p = probe(r#"{"n": [1], "s": true}"#);
        assert_eq!(p.n, Field::WrongType("an array"));
        assert_eq!(p.s, Field::WrongType("a boolean"));
        assert_eq!(probe(r#"{"s": 7}"#).s, Field::WrongType("a number"));
    }
}
