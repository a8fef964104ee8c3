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
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(path_string(&path));
    let res: Result<T, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut record));
    let mut details: Vec<ErrorDetail> = unknown
        .into_iter()
        .map(|path| ErrorDetail { path, message: "unknown field".to_owned() })
        .collect();
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

/// `roles[1].isDataConsumr` for a serde_ignored path.
fn path_string(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_string(parent)),
        Path::Map { parent, key } => {
            let parent = path_string(parent);
            if parent.is_empty() { key.clone() } else { format!("{parent}.{key}") }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_string(parent),
    }
}
