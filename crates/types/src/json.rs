//! JSON parsing that is lenient about comments and strict about fields.
//!
//! Flame's example files annotate themselves with keys that begin with `//`
//! (`{"// note": "..."}`); those keys are comments and are removed, at any depth, before typed
//! parsing. Every other key must be a field of the target type: unknown fields are reported
//! with their full path (`roles[1].isDataConsumr`), all of them at once, so a user sees every
//! typo in one round trip. A type error or a missing field names its path too.
//!
//! The DTOs themselves do not carry `deny_unknown_fields`: strictness lives here, in
//! [`from_slice`] and [`from_value`], so that readers that must tolerate newer fields (a worker
//! reading a [`TaskConfig`](crate::TaskConfig)) can use [`from_slice_lenient`] or plain
//! `serde_json` on the very same types.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ErrorDetail;

/// Whether `key` is a comment key (begins with `//`).
pub fn is_comment_key(key: &str) -> bool {
    key.starts_with("//")
}

/// Removes every object key that begins with `//`, recursively.
pub fn strip_comments(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|key, _| !is_comment_key(key));
            map.values_mut().for_each(strip_comments);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_comments),
        _ => {}
    }
}

/// Parses JSON bytes into `T`: comment keys are dropped, unknown fields are errors.
///
/// Returns every problem found: malformed JSON gives one detail with its line and column;
/// otherwise all unknown fields are listed, plus the first type error or missing field.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Vec<ErrorDetail>> {
    from_value(parse(bytes)?)
}

/// Parses an already decoded JSON value into `T`, as strictly as [`from_slice`].
pub fn from_value<T: DeserializeOwned>(mut value: Value) -> Result<T, Vec<ErrorDetail>> {
    strip_comments(&mut value);
    // (path of the object, unknown key) for every key the target type ignored.
    let mut unknown: Vec<(String, String)> = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| {
        if let serde_ignored::Path::Map { parent, key } = path {
            unknown.push((path_string(parent), key));
        }
    };
    let res: Result<T, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(&value, &mut record));
    let mut details = Vec::new();
    if !unknown.is_empty() {
        let fields = probe::struct_fields::<T>(&value);
        details.extend(unknown.into_iter().map(|(parent, key)| ErrorDetail {
            path: join(&parent, &key),
            message: unknown_field_message(&key, fields.get(&parent).copied()),
        }));
    }
    match res {
        Ok(parsed) if details.is_empty() => Ok(parsed),
        Ok(_) => Err(details),
        Err(err) => {
            details.push(ErrorDetail {
                path: error_path(err.path()),
                message: err.inner().to_string(),
            });
            Err(details)
        }
    }
}

/// `unknown field, did you mean `isDataConsumer`? (expected one of: name, ...)`.
fn unknown_field_message(key: &str, expected: Option<&[&str]>) -> String {
    let Some(expected) = expected.filter(|e| !e.is_empty()) else {
        return "unknown field".to_owned();
    };
    let closest = expected
        .iter()
        .map(|field| (edit_distance(key, field), *field))
        .min()
        .filter(|(distance, field)| *distance <= 2.max(field.len() / 4));
    let list = expected.join(", ");
    match closest {
        Some((_, field)) => {
            format!("unknown field, did you mean `{field}`? (expected one of: {list})")
        }
        None => format!("unknown field, expected one of: {list}"),
    }
}

/// Levenshtein distance, case-insensitive (field names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_owned() } else { format!("{parent}.{key}") }
}

/// Parses JSON bytes into `T`, dropping comment keys and ignoring unknown fields.
///
/// For readers that must accept what newer writers add, such as a worker reading its
/// [`TaskConfig`](crate::TaskConfig). Type errors and missing fields still name their path.
pub fn from_slice_lenient<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Vec<ErrorDetail>> {
    let mut value = parse(bytes)?;
    strip_comments(&mut value);
    serde_path_to_error::deserialize(value).map_err(|err| {
        vec![ErrorDetail { path: error_path(err.path()), message: err.inner().to_string() }]
    })
}

/// Decodes bytes as JSON, or one detail with the line and column of the syntax error.
fn parse(bytes: &[u8]) -> Result<Value, Vec<ErrorDetail>> {
    serde_json::from_slice(bytes).map_err(|err| {
        vec![ErrorDetail {
            path: String::new(),
            message: format!(
                "malformed JSON at line {} column {}: {}",
                err.line(),
                err.column(),
                strip_position(&err.to_string())
            ),
        }]
    })
}

/// serde_json appends " at line L column C" to its messages; we print the position first.
fn strip_position(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(pos) => &message[..pos],
        None => message,
    }
}

/// `roles[1].name` for a serde_path_to_error path (its root prints as `.`).
fn error_path(path: &serde_path_to_error::Path) -> String {
    let res = path.to_string();
    if res == "." { String::new() } else { res }
}

/// `roles[1].groupBy` for a serde_ignored path.
fn path_string(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_string(parent)),
        Path::Map { parent, key } => join(&path_string(parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_string(parent),
    }
}

/// Finds the field names a type expects at each path, to list them in unknown-field errors.
///
/// serde's derive hands a struct's field names to `Deserializer::deserialize_struct`; this
/// deserializer walks a JSON value like `serde_json` would and records those names under the
/// same paths that [`path_string`] prints. Its result is discarded: it only observes.
mod probe {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use serde::de::value::{Error, StrDeserializer};
    use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer, Visitor};
    use serde_json::Value;

    type Fields = HashMap<String, &'static [&'static str]>;

    /// Path → the field names of the struct deserialized there.
    pub(super) fn struct_fields<T: DeserializeOwned>(value: &Value) -> Fields {
        let fields = RefCell::new(Fields::new());
        let probe = Probe { value, path: String::new(), fields: &fields };
        // Type errors are reported by the real parse; here only the recorded names matter.
        let _ = T::deserialize(probe);
        fields.into_inner()
    }

    struct Probe<'a> {
        value: &'a Value,
        path: String,
        fields: &'a RefCell<Fields>,
    }

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = Error;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.value {
                Value::Null => visitor.visit_unit(),
                Value::Bool(b) => visitor.visit_bool(*b),
                Value::Number(n) => {
                    if let Some(u) = n.as_u64() {
                        visitor.visit_u64(u)
                    } else if let Some(i) = n.as_i64() {
                        visitor.visit_i64(i)
                    } else {
                        visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                    }
                }
                Value::String(s) => visitor.visit_str(s),
                Value::Array(items) => visitor.visit_seq(Seq {
                    items: items.iter().enumerate(),
                    path: self.path,
                    fields: self.fields,
                }),
                Value::Object(map) => visitor.visit_map(Map {
                    entries: map.iter(),
                    pending: None,
                    path: self.path,
                    fields: self.fields,
                }),
            }
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.value {
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

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            self.fields.borrow_mut().insert(self.path.clone(), fields);
            self.deserialize_any(visitor)
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            // Our enums are unit enums (`"mqtt"`); serde_json's own logic is enough here.
            self.value.clone().deserialize_enum(name, variants, visitor).map_err(de::Error::custom)
        }

        fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_unit()
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier
        }
    }

    struct Seq<'a, I> {
        items: I,
        path: String,
        fields: &'a RefCell<Fields>,
    }

    impl<'a, 'de, I: Iterator<Item = (usize, &'a Value)>> de::SeqAccess<'de> for Seq<'a, I> {
        type Error = Error;

        fn next_element_seed<S: de::DeserializeSeed<'de>>(
            &mut self,
            seed: S,
        ) -> Result<Option<S::Value>, Error> {
            match self.items.next() {
                Some((index, value)) => seed
                    .deserialize(Probe {
                        value,
                        path: format!("{}[{index}]", self.path),
                        fields: self.fields,
                    })
                    .map(Some),
                None => Ok(None),
            }
        }
    }

    struct Map<'a, I> {
        entries: I,
        pending: Option<(&'a String, &'a Value)>,
        path: String,
        fields: &'a RefCell<Fields>,
    }

    impl<'a, 'de, I: Iterator<Item = (&'a String, &'a Value)>> de::MapAccess<'de> for Map<'a, I> {
        type Error = Error;

        fn next_key_seed<K: de::DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Error> {
            match self.entries.next() {
                Some((key, value)) => {
                    self.pending = Some((key, value));
                    let key: StrDeserializer<'_, Error> = key.as_str().into_deserializer();
                    seed.deserialize(key).map(Some)
                }
                None => Ok(None),
            }
        }

        fn next_value_seed<S: de::DeserializeSeed<'de>>(
            &mut self,
            seed: S,
        ) -> Result<S::Value, Error> {
            let (key, value) = self
                .pending
                .take()
                .ok_or_else(|| de::Error::custom("value requested before its key"))?;
            seed.deserialize(Probe {
                value,
                path: super::join(&self.path, key),
                fields: self.fields,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::job::JobSpec;
    use crate::schema::Schema;
    use crate::task_config::TaskConfig;

    #[test]
    fn comment_keys_are_dropped_at_every_depth() {
        let mut value = json!({
            "//": "top",
            "a": [{"// x": 1, "b": {"//": [1, 2], "c": 3}}],
            "not/a/comment": 1,
        });
        strip_comments(&mut value);
        assert_eq!(value, json!({"a": [{"b": {"c": 3}}], "not/a/comment": 1}));
        let schema: Schema = from_slice(
            br#"{"//": "note", "roles": [{"//": "r", "name": "t", "isDataConsumer": true}],
                 "channels": []}"#,
        )
        .expect("comments parse");
        assert_eq!(schema.roles[0].name, "t");
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let errors = from_slice::<Schema>(b"{\n  \"roles\": [,]\n}").expect_err("malformed");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "");
        assert!(
            errors[0].message.starts_with("malformed JSON at line 2 column 13"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn every_unknown_field_and_the_type_error_are_reported_together() {
        let errors = from_value::<JobSpec>(json!({
            "name": "j",
            "designId": "d",
            "prority": "high",
            "modelSpec": {"optimizer": {"sort": "fedavg", "kwarg": {}}},
            "maxRunTime": "soon",
        }))
        .expect_err("invalid");
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["prority", "modelSpec.optimizer.kwarg", "maxRunTime"]);
        assert!(errors[0].message.contains("did you mean `priority`?"));
        assert!(errors[1].message.contains("expected one of: sort, kwargs"));
        assert!(errors[2].message.starts_with("invalid type: string \"soon\""));
        // Free-form maps accept any key.
        let spec: JobSpec = from_value(json!({
            "name": "j", "designId": "d",
            "modelSpec": {"hyperparameters": {"anything": 1}}
        }))
        .expect("hyperparameters are free-form");
        assert_eq!(spec.model_spec.hyperparameters["anything"], 1);
    }

    #[test]
    fn task_configs_tolerate_fields_from_newer_writers() {
        let config = json!({
            "taskId": "t", "role": "trainer", "job": {"id": "j", "futureField": 1},
            "channels": [{"name": "c", "pair": ["trainer", "aggregator"], "qos": 2}],
            "newTopLevel": true,
        });
        let bytes = serde_json::to_vec(&config).expect("serialise");
        let lenient: TaskConfig = from_slice_lenient(&bytes).expect("lenient read");
        assert_eq!(lenient.channels[0].name, "c");
        let plain: TaskConfig = serde_json::from_slice(&bytes).expect("plain serde_json read");
        assert_eq!(plain, lenient);
        let strict = from_slice::<TaskConfig>(&bytes).expect_err("strict read");
        assert_eq!(strict.len(), 3, "{strict:?}");
        let missing = from_slice_lenient::<TaskConfig>(br#"{"role": "trainer"}"#)
            .expect_err("taskId is required");
        assert_eq!(missing[0].message, "missing field `taskId`");
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("pair", "pairs"), 1);
        assert_eq!(edit_distance("isDataConsumr", "isDataConsumer"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
