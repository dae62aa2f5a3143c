//! Parsing requests at the edge: the JSON body (bounded, an object, no unknown fields) read
//! straight into the route's typed fields, each refusal naming its field, and the
//! `Idempotency-Key` header.
//!
//! A body is parsed in one pass into a struct of [`Field`]s (declared with [`body_fields!`]):
//! no `serde_json::Value` tree is built for the fields a route knows. A field of the wrong
//! JSON type does not stop the parse: it is kept as the refusal it will be, so the handler
//! still checks the fields in its own order and a syntax error anywhere in the body still
//! wins, exactly as when the body was first parsed whole into a `Value`:
//!
//! - a body that is not JSON: `body` "is not valid JSON (…)", serde_json's message;
//! - JSON that is not an object: `body` "must be a JSON object";
//! - a duplicate key: the last one counts;
//! - `null` is an absent field;
//! - unknown fields: the first in byte order of its name is named (the order of the
//!   `serde_json::Map` the handlers used to read), its value parsed as any JSON value.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Number, Value};

use super::error::ApiError;
use super::AppState;
use crate::ids::IdempotencyKey;

/// A request body of at most `server.max_body_bytes` that is a JSON object, read into `T`'s
/// fields; the name of the first unknown field, if any, is kept for [`JsonBody::into_known`],
/// the only way to the fields.
pub struct JsonBody<T> {
    fields: T,
    unknown: Option<String>,
}

impl<T: BodyFields> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let limit = state.config.settings.server.max_body_bytes;
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| {
                ApiError::invalid("body", format!("must be at most {limit} bytes of JSON"))
            })?;
        JsonBody::parse(&bytes)
    }
}

impl<T: BodyFields> JsonBody<T> {
    /// The body's fields, or the refusal of a body that is not a JSON object.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let not_json =
            |e: serde_json::Error| ApiError::invalid("body", format!("is not valid JSON ({e})"));
        match serde_json::from_slice::<TopLevel<T>>(bytes) {
            Ok(TopLevel::Object(body)) => Ok(body),
            Ok(TopLevel::NotObject) => Err(not_an_object()),
            // serde_json reads an object whose first key is its raw-value token as the JSON
            // text of that key's value: rare enough to be read the way it always was.
            Err(e) if e.to_string().starts_with(RAW_VALUE_TOKEN) => {
                match serde_json::from_slice::<Value>(bytes) {
                    Ok(value @ Value::Object(_)) => {
                        match serde_json::from_value::<TopLevel<T>>(value) {
                            Ok(TopLevel::Object(body)) => Ok(body),
                            Ok(TopLevel::NotObject) => Err(not_an_object()),
                            Err(e) => Err(not_json(e)),
                        }
                    }
                    Ok(_) => Err(not_an_object()),
                    Err(e) => Err(not_json(e)),
                }
            }
            Err(e) => Err(not_json(e)),
        }
    }

    /// The fields, unless the body has one the route does not know: a misspelt optional
    /// field must not be ignored.
    pub fn into_known(self) -> Result<T, ApiError> {
        match self.unknown {
            Some(unknown) => Err(ApiError::invalid(unknown, "is not a known field")),
            None => Ok(self.fields),
        }
    }
}

fn not_an_object() -> ApiError {
    ApiError::invalid("body", "must be a JSON object")
}

/// serde_json's private key that makes a `Value` read its string value as raw JSON text
/// (feature `raw_value`, on in this workspace).
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// What the top of a body is.
enum TopLevel<T> {
    Object(JsonBody<T>),
    NotObject,
}

/// A route's body: a struct of [`Field`]s. Implemented by [`body_fields!`].
pub trait BodyFields: Default {
    /// Reads the value of `key` into its field; `false` when `key` is not one of them (its
    /// value is then still to be read).
    fn read_field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> Result<bool, A::Error>;
}

/// Declares a route's body: a struct whose fields are [`Field`]s named as in the JSON.
macro_rules! body_fields {
    ($(#[$meta:meta])* $vis:vis struct $name:ident {
        $($(#[$field_meta:meta])* $field:ident: $ty:ty,)*
    }) => {
        $(#[$meta])*
        $vis struct $name {
            $($(#[$field_meta])* pub $field: $crate::api::extract::Field<$ty>,)*
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    $($field: $crate::api::extract::Field::absent(stringify!($field)),)*
                }
            }
        }

        impl $crate::api::extract::BodyFields for $name {
            fn read_field<'de, A: serde::de::MapAccess<'de>>(
                &mut self,
                key: &str,
                map: &mut A,
            ) -> Result<bool, A::Error> {
                match key {
                    $(stringify!($field) => self.$field.read(map)?,)*
                    _ => return Ok(false),
                }
                Ok(true)
            }
        }
    };
}
pub(crate) use body_fields;

impl<'de, T: BodyFields> Deserialize<'de> for TopLevel<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TopLevelVisitor(PhantomData))
    }
}

struct TopLevelVisitor<T>(PhantomData<T>);

impl<'de, T: BodyFields> Visitor<'de> for TopLevelVisitor<T> {
    type Value = TopLevel<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel<T>, A::Error> {
        let mut fields = T::default();
        let mut unknown: Option<String> = None;
        let mut first = true;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if std::mem::take(&mut first) && key.0 == RAW_VALUE_TOKEN {
                // Read again as a `Value` by `JsonBody::parse`.
                return Err(de::Error::custom(RAW_VALUE_TOKEN));
            }
            if !fields.read_field(&key.0, &mut map)? {
                let _: Value = map.next_value()?;
                if unknown.as_deref().is_none_or(|u| key.0.as_ref() < u) {
                    unknown = Some(key.0.into_owned());
                }
            }
        }
        Ok(TopLevel::Object(JsonBody { fields, unknown }))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<TopLevel<T>, A::Error> {
        Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        Ok(TopLevel::NotObject)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<TopLevel<T>, E> {
        Ok(TopLevel::NotObject)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<TopLevel<T>, E> {
        Ok(TopLevel::NotObject)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<TopLevel<T>, E> {
        Ok(TopLevel::NotObject)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<TopLevel<T>, E> {
        Ok(TopLevel::NotObject)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<TopLevel<T>, E> {
        Ok(TopLevel::NotObject)
    }

    fn visit_unit<E: de::Error>(self) -> Result<TopLevel<T>, E> {
        Ok(TopLevel::NotObject)
    }
}

/// An object key, borrowed from the body unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }

            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }

            fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// One field of a body: absent (or `null`), given with its expected JSON type, or given with
/// another (kept as the refusal it will be: checked in the handler's order, not the body's).
#[derive(Debug)]
pub struct Field<T> {
    name: &'static str,
    given: Given<T>,
}

#[derive(Debug)]
pub enum Given<T> {
    Absent,
    Value(T),
    /// Another JSON type: the message that refuses it.
    Wrong(&'static str),
}

impl<T> Field<T> {
    pub fn absent(name: &'static str) -> Self {
        Self {
            name,
            given: Given::Absent,
        }
    }

    /// Reads the field's value (the last one counts when a key is repeated).
    pub fn read<'de, A: MapAccess<'de>>(&mut self, map: &mut A) -> Result<(), A::Error>
    where
        T: FieldType,
    {
        self.given = map.next_value()?;
        Ok(())
    }

    /// The field as given: `None` when absent, a refusal naming it when of another type.
    pub fn get(&self) -> Result<Option<&T>, ApiError> {
        match &self.given {
            Given::Absent => Ok(None),
            Given::Value(value) => Ok(Some(value)),
            Given::Wrong(message) => Err(ApiError::invalid(self.name, *message)),
        }
    }

    /// As [`Field::get`], taking the value.
    pub fn take(&mut self) -> Result<Option<T>, ApiError> {
        match std::mem::replace(&mut self.given, Given::Absent) {
            Given::Absent => Ok(None),
            Given::Value(value) => Ok(Some(value)),
            Given::Wrong(message) => {
                self.given = Given::Wrong(message);
                Err(ApiError::invalid(self.name, message))
            }
        }
    }
}

impl Field<String> {
    pub fn str(&self) -> Result<Option<&str>, ApiError> {
        Ok(self.get()?.map(String::as_str))
    }

    pub fn required_str(&self) -> Result<&str, ApiError> {
        self.str()?
            .ok_or_else(|| ApiError::invalid(self.name, "is required"))
    }

    /// A string of at most `max_chars` characters.
    pub fn bounded_str(&self, max_chars: usize) -> Result<Option<&str>, ApiError> {
        let value = self.str()?;
        if let Some(s) = value {
            if s.chars().count() > max_chars {
                return Err(ApiError::invalid(
                    self.name,
                    format!("must be at most {max_chars} characters"),
                ));
            }
        }
        Ok(value)
    }
}

/// The JSON types a field may expect, and the refusal of any other.
pub trait FieldType: Sized {
    /// The refusal of a value of another JSON type.
    const WRONG: &'static str;

    fn from_str(_: &str) -> Option<Self> {
        None
    }

    fn from_string(s: String) -> Option<Self> {
        Self::from_str(&s)
    }

    /// A number, or the refusal of this one.
    fn from_number(_: Number) -> Result<Self, &'static str> {
        Err(Self::WRONG)
    }

    fn from_object(_: Map<String, Value>) -> Option<Self> {
        None
    }
}

impl FieldType for String {
    const WRONG: &'static str = "must be a string";

    fn from_str(s: &str) -> Option<Self> {
        Some(s.to_owned())
    }

    fn from_string(s: String) -> Option<Self> {
        Some(s)
    }
}

impl FieldType for u64 {
    const WRONG: &'static str = "must be an integer";

    fn from_number(n: Number) -> Result<Self, &'static str> {
        n.as_u64().ok_or("must be a non-negative integer")
    }
}

impl FieldType for Map<String, Value> {
    const WRONG: &'static str = "must be an object";

    fn from_object(map: Map<String, Value>) -> Option<Self> {
        Some(map)
    }
}

impl<'de, T: FieldType> Deserialize<'de> for Given<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(GivenVisitor(PhantomData))
    }
}

/// Reads any JSON value as `serde_json::Value` would (numbers and nested values alike), and
/// keeps it when it is of `T`'s type.
struct GivenVisitor<T>(PhantomData<T>);

impl<T: FieldType> GivenVisitor<T> {
    fn given(value: Option<T>) -> Given<T> {
        value.map_or(Given::Wrong(T::WRONG), Given::Value)
    }

    fn number(n: Number) -> Given<T> {
        match T::from_number(n) {
            Ok(value) => Given::Value(value),
            Err(message) => Given::Wrong(message),
        }
    }
}

impl<'de, T: FieldType> Visitor<'de> for GivenVisitor<T> {
    type Value = Given<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Given<T>, E> {
        Ok(Given::Absent)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Given<T>, E> {
        Ok(Given::Wrong(T::WRONG))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Given<T>, E> {
        Ok(Self::number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Given<T>, E> {
        Ok(Self::number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Given<T>, E> {
        // As `Value`: a float without a JSON form is `null`.
        Ok(Number::from_f64(v).map_or(Given::Absent, Self::number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Given<T>, E> {
        Ok(Self::given(T::from_str(v)))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Given<T>, E> {
        Ok(Self::given(T::from_string(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Given<T>, A::Error> {
        Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Given::Wrong(T::WRONG))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Given<T>, A::Error> {
        // Through `Value`'s own reading of an object (its raw-value key included).
        match Value::deserialize(de::value::MapAccessDeserializer::new(map))? {
            Value::Object(map) => Ok(Self::given(T::from_object(map))),
            Value::Null => Ok(Given::Absent),
            Value::Number(n) => Ok(Self::number(n)),
            Value::String(s) => Ok(Self::given(T::from_string(s))),
            Value::Bool(_) | Value::Array(_) => Ok(Given::Wrong(T::WRONG)),
        }
    }
}

pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The `Idempotency-Key` header, parsed; `None` when absent.
pub fn idempotency_key(
    headers: &HeaderMap,
    max_chars: usize,
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key", "must be visible ASCII"))?;
    IdempotencyKey::parse(text, max_chars)
        .map(Some)
        .map_err(|e| ApiError::invalid("Idempotency-Key", e.to_string()))
}

/// The `Idempotency-Key` header of a POST, which must carry one.
pub fn required_idempotency_key(
    headers: &HeaderMap,
    max_chars: usize,
) -> Result<IdempotencyKey, ApiError> {
    idempotency_key(headers, max_chars)?
        .ok_or_else(|| ApiError::invalid("Idempotency-Key", "header is required on this request"))
}

pub use crate::time::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    body_fields! {
        struct Probe {
            s: String,
            n: u64,
            m: Map<String, Value>,
        }
    }

    /// How the handlers read a body before typed fields: parsed whole into a `Value`, then
    /// read field by field. Every refusal of the typed reading must be this one's.
    struct Reference(Map<String, Value>);

    impl Reference {
        fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
            match serde_json::from_slice::<Value>(bytes) {
                Ok(Value::Object(map)) => Ok(Reference(map)),
                Ok(_) => Err(ApiError::invalid("body", "must be a JSON object")),
                Err(e) => Err(ApiError::invalid(
                    "body",
                    format!("is not valid JSON ({e})"),
                )),
            }
        }

        fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
            match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
                Some(unknown) => Err(ApiError::invalid(unknown.clone(), "is not a known field")),
                None => Ok(()),
            }
        }

        fn str(&self, field: &str) -> Result<Option<&str>, ApiError> {
            match self.0.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(ApiError::invalid(field, "must be a string")),
            }
        }

        fn required_str(&self, field: &str) -> Result<&str, ApiError> {
            self.str(field)?
                .ok_or_else(|| ApiError::invalid(field, "is required"))
        }

        fn bounded_str(&self, field: &str, max_chars: usize) -> Result<Option<&str>, ApiError> {
            let value = self.str(field)?;
            if let Some(s) = value {
                if s.chars().count() > max_chars {
                    return Err(ApiError::invalid(
                        field,
                        format!("must be at most {max_chars} characters"),
                    ));
                }
            }
            Ok(value)
        }

        fn u64(&self, field: &str) -> Result<Option<u64>, ApiError> {
            match self.0.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => n
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| ApiError::invalid(field, "must be a non-negative integer")),
                Some(_) => Err(ApiError::invalid(field, "must be an integer")),
            }
        }

        fn object(&self, field: &str) -> Result<Option<&Map<String, Value>>, ApiError> {
            match self.0.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(map)) => Ok(Some(map)),
                Some(_) => Err(ApiError::invalid(field, "must be an object")),
            }
        }
    }

    /// Every way of reading every field of `text`, typed and by reference: the same answers.
    fn same_as_reference(text: &str) {
        let typed = JsonBody::<Probe>::parse(text.as_bytes());
        let reference = Reference::parse(text.as_bytes());
        let (typed, reference) = match (typed, reference) {
            (Ok(typed), Ok(reference)) => (typed, reference),
            (typed, reference) => {
                assert_eq!(typed.err(), reference.err(), "{text}");
                return;
            }
        };
        let known = JsonBody {
            fields: Probe::default(),
            unknown: typed.unknown.clone(),
        }
        .into_known()
        .map(drop);
        assert_eq!(known, reference.only(&["s", "n", "m"]), "{text}");
        // Each field as read, whatever the others are.
        let fields = &typed.fields;
        assert_eq!(fields.s.str(), reference.str("s"), "{text}");
        assert_eq!(
            fields.s.required_str(),
            reference.required_str("s"),
            "{text}"
        );
        assert_eq!(
            fields.s.bounded_str(3),
            reference.bounded_str("s", 3),
            "{text}"
        );
        assert_eq!(
            fields.n.get().map(Option::<&u64>::copied),
            reference.u64("n"),
            "{text}"
        );
        assert_eq!(fields.m.get(), reference.object("m"), "{text}");
    }

    #[test]
    fn typed_fields_refuse_exactly_as_the_value_tree_did() {
        let values = [
            r#""text""#,
            r#""é∂""#,
            r#""a\"b\u0041""#,
            r#""abcd""#,
            "0",
            "7",
            "-7",
            "-0",
            "7.0",
            "1e3",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "1e400",
            "true",
            "false",
            "null",
            "[]",
            "[1, [2, {\"a\": 1e400}]]",
            "{}",
            r#"{"k": "v"}"#,
            r#"{"k": 1, "k": "v"}"#,
            r#"{"$serde_json::private::RawValue": "{\"k\": \"v\"}"}"#,
            r#"{"$serde_json::private::RawValue": "17"}"#,
            r#"{"$serde_json::private::RawValue": 17}"#,
        ];
        for value in values {
            for name in ["s", "n", "m", "other", "S", "a"] {
                same_as_reference(&format!("{{\"{name}\": {value}}}"));
                same_as_reference(&format!("{{\"s\": \"x\", \"{name}\": {value}, \"n\": 3}}"));
                // Repeated keys: the last one counts.
                same_as_reference(&format!("{{\"{name}\": {value}, \"{name}\": \"y\"}}"));
                same_as_reference(&format!("{{\"{name}\": \"y\", \"{name}\": {value}}}"));
            }
            same_as_reference(value);
        }
        for text in [
            "",
            " ",
            "{",
            "{\"s\":",
            "{\"s\": \"x\",}",
            "{\"s\": \"x\"} trailing",
            "{\"s\": \"x\"}\n",
            "{\"zz\": 1, \"s\": 5, \"b\": 2, \"aa\": [1,}",
            "{\"zz\": 1, \"s\": 5, \"b\": 2}",
            "{\"s\": \"\\ud800\"}",
            "{\"s\u{0}\": 1}",
            "{\"s\": \"\u{1}\"}",
            "{\"\\u0073\": 5}",
            "{\"s\": 1e400, \"n\": \"x\"}",
            "{\"n\": -1, \"s\": 5}",
            "{1: 2}",
            "[1, 2",
            "\"str",
            "nul",
            "{\"$serde_json::private::RawValue\": \"[1]\"}",
            "{\"s\": \"x\", \"$serde_json::private::RawValue\": \"[1]\"}",
            "{\"$serde_json::private::RawValue\": \"{\\\"s\\\": 5, \\\"q\\\": 1}\"}",
            "{\"$serde_json::private::RawValue\": \"{\\\"s\\\": \\\"x\\\"}\"}",
            "{\"$serde_json::private::RawValue\": \"not json\"}",
        ] {
            same_as_reference(text);
        }
        let deep = format!("{{\"m\": {}{}}}", "[".repeat(200), "]".repeat(200));
        same_as_reference(&deep);
        let deep_unknown = format!("{{\"q\": {}{}}}", "{\"a\":".repeat(200), "}".repeat(200));
        same_as_reference(&deep_unknown);
    }
}
