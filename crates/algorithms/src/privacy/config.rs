//! Strict parsing of the privacy sections of a model spec (`secureAggregation`,
//! `differentialPrivacy`): every unknown field, wrong type or out-of-range value is a
//! [`ConfigError`] naming the field by its path (`secureAggregation.threshold`). Keys that
//! begin with `//` are comments, as elsewhere in Fledge's JSON.

use serde_json::{Map, Value};

/// What is wrong with a privacy config, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The field's path, e.g. `secureAggregation.threshold`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

/// Reads the fields of one JSON object; each accessor removes what it reads so that
/// [`Fields::finish`] reports leftovers as unknown.
pub(crate) struct Fields {
    path: String,
    map: Map<String, Value>,
}

impl Fields {
    pub(crate) fn new(value: &Value, path: &str) -> Result<Self, ConfigError> {
        let obj = value
            .as_object()
            .ok_or_else(|| ConfigError::new(path, format!("must be an object, got {value}")))?;
        let map = obj
            .iter()
            .filter(|(k, _)| !k.starts_with("//"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Self { path: path.to_owned(), map })
    }

    pub(crate) fn field(&self, name: &str) -> String {
        format!("{}.{name}", self.path)
    }

    pub(crate) fn err(&self, name: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(self.field(name), reason)
    }

    pub(crate) fn take(&mut self, name: &str) -> Option<Value> {
        match self.map.remove(name) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// An optional finite number.
    pub(crate) fn number(&mut self, name: &str) -> Result<Option<f64>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if v.is_finite() => Ok(Some(v)),
                _ => Err(self.err(name, format!("{n} is not a finite number"))),
            },
            Some(other) => Err(self.err(name, format!("expected a number, got {other}"))),
        }
    }

    /// A required finite number.
    pub(crate) fn required_number(&mut self, name: &str) -> Result<f64, ConfigError> {
        self.number(name)?.ok_or_else(|| self.err(name, "is required"))
    }

    /// An optional non-negative integer.
    pub(crate) fn integer(&mut self, name: &str) -> Result<Option<u64>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.err(name, format!("expected a non-negative integer, got {n}"))),
            Some(other) => {
                Err(self.err(name, format!("expected a non-negative integer, got {other}")))
            }
        }
    }

    /// A required non-negative integer.
    pub(crate) fn required_integer(&mut self, name: &str) -> Result<u64, ConfigError> {
        self.integer(name)?.ok_or_else(|| self.err(name, "is required"))
    }

    /// An optional string.
    pub(crate) fn string(&mut self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.err(name, format!("expected a string, got {other}"))),
        }
    }

    /// Fails on the first field no accessor read; `valid` lists the accepted ones.
    pub(crate) fn finish(self, valid: &[&str]) -> Result<(), ConfigError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(name) => {
                Err(self.err(name, format!("unknown field (valid fields: {})", valid.join(", "))))
            }
        }
    }
}
