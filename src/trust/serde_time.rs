//! Timestamps (`Micros`) as RFC 3339 strings in the files and JSON this module writes, so key files
//! and anomaly records are readable by people settling a dispute.

pub mod rfc3339 {
    use crate::domain::{format_rfc3339, parse_rfc3339, Micros};
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Micros, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Micros, D::Error> {
        let text = String::deserialize(d)?;
        parse_rfc3339(&text).ok_or_else(|| D::Error::custom("expected an RFC 3339 date-time"))
    }
}

pub mod opt_rfc3339 {
    use crate::domain::{format_rfc3339, parse_rfc3339, Micros};
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<Micros>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&format_rfc3339(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Micros>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => parse_rfc3339(&text)
                .map(Some)
                .ok_or_else(|| D::Error::custom("expected an RFC 3339 date-time")),
            None => Ok(None),
        }
    }
}
