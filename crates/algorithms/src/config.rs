//! Parsing of the `{sort, kwargs}` objects that pick an optimizer or a selector.
//!
//! A job's `modelSpec` carries `optimizer` and `selector` objects in Cisco Flame's shape:
//! `{"sort": "fedadam", "kwargs": {"lr": 0.01}}`. Sorts are matched case-insensitively;
//! kwargs use Flame's camelCase names. Every mistake is an [`Error`] that names the sort and
//! the offending field, and lists what is accepted. Keys that begin with `//` are comments
//! and are ignored, as elsewhere in Fledge's JSON.

use serde_json::{Map, Value};

/// What is wrong with an optimizer or selector config.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The config is not a JSON object.
    #[error("{what} must be an object like {{\"sort\": \"...\", \"kwargs\": {{...}}}}, got {got}")]
    NotAnObject {
        /// `optimizer` or `selector`.
        what: &'static str,
        /// The JSON that was given.
        got: String,
    },
    /// The `sort` field is missing or not a string.
    #[error("{what}.sort is missing or not a string (valid sorts: {valid})")]
    MissingSort {
        /// `optimizer` or `selector`.
        what: &'static str,
        /// The accepted sorts, comma-separated.
        valid: String,
    },
    /// The sort is not one this crate implements.
    #[error("unknown {what} sort '{sort}' (valid sorts: {valid})")]
    UnknownSort {
        /// `optimizer` or `selector`.
        what: &'static str,
        /// The sort that was given.
        sort: String,
        /// The accepted sorts, comma-separated.
        valid: String,
    },
    /// A top-level field other than `sort` and `kwargs`.
    #[error("unknown field '{field}' in {what} (expected 'sort' and 'kwargs')")]
    UnknownField {
        /// `optimizer` or `selector`.
        what: &'static str,
        /// The field that was given.
        field: String,
    },
    /// `kwargs` is not an object.
    #[error("{what}.kwargs of sort '{sort}' must be an object, got {got}")]
    KwargsNotObject {
        /// `optimizer` or `selector`.
        what: &'static str,
        /// The sort.
        sort: &'static str,
        /// The JSON that was given.
        got: String,
    },
    /// A kwarg this sort does not take.
    #[error("unknown kwarg '{name}' for {what} sort '{sort}' (valid kwargs: {valid})")]
    UnknownKwarg {
        /// `optimizer` or `selector`.
        what: &'static str,
        /// The sort.
        sort: &'static str,
        /// The kwarg that was given.
        name: String,
        /// The accepted kwargs, comma-separated (`none` if the sort takes none).
        valid: String,
    },
    /// A kwarg with a value of the wrong type or out of range.
    #[error("invalid kwarg '{name}' for {what} sort '{sort}': {reason}")]
    BadKwarg {
        /// `optimizer` or `selector`.
        what: &'static str,
        /// The sort.
        sort: &'static str,
        /// The kwarg.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Splits `{sort, kwargs}`, resolving the sort against `valid` (case-insensitive).
pub(crate) fn parse_sort(
    value: &Value,
    what: &'static str,
    valid: &'static [&'static str],
) -> Result<Kwargs> {
    let obj =
        value.as_object().ok_or_else(|| Error::NotAnObject { what, got: value.to_string() })?;
    for key in obj.keys() {
        if key != "sort" && key != "kwargs" && !key.starts_with("//") {
            return Err(Error::UnknownField { what, field: key.clone() });
        }
    }
    let given = obj
        .get("sort")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::MissingSort { what, valid: valid.join(", ") })?;
    let sort =
        valid.iter().copied().find(|s| s.eq_ignore_ascii_case(given.trim())).ok_or_else(|| {
            Error::UnknownSort { what, sort: given.to_owned(), valid: valid.join(", ") }
        })?;
    let map = match obj.get("kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map
            .iter()
            .filter(|(k, _)| !k.starts_with("//"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        Some(other) => {
            return Err(Error::KwargsNotObject { what, sort, got: other.to_string() });
        }
    };
    Ok(Kwargs { what, sort, map })
}

/// The kwargs of one sort; each accessor removes the key it reads so that [`Kwargs::finish`]
/// can report leftovers as unknown.
#[derive(Debug)]
pub(crate) struct Kwargs {
    pub(crate) what: &'static str,
    pub(crate) sort: &'static str,
    map: Map<String, Value>,
}

impl Kwargs {
    fn bad(&self, name: &'static str, reason: impl Into<String>) -> Error {
        Error::BadKwarg { what: self.what, sort: self.sort, name, reason: reason.into() }
    }

    /// A number (`default` when absent) that `check` accepts (it returns the reason otherwise).
    pub(crate) fn number(
        &mut self,
        name: &'static str,
        default: f64,
        check: impl Fn(f64) -> Option<&'static str>,
    ) -> Result<f64> {
        let v = match self.map.remove(name) {
            None | Some(Value::Null) => default,
            Some(Value::Number(n)) => {
                n.as_f64().ok_or_else(|| self.bad(name, format!("{n} is not representable")))?
            }
            Some(other) => return Err(self.bad(name, format!("expected a number, got {other}"))),
        };
        match check(v) {
            Some(reason) => Err(self.bad(name, format!("{reason}, got {v}"))),
            None => Ok(v),
        }
    }

    /// A non-negative integer (`default` when absent) that is at least `min`.
    pub(crate) fn integer(&mut self, name: &'static str, default: u64, min: u64) -> Result<u64> {
        let v = match self.map.remove(name) {
            None | Some(Value::Null) => default,
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
                self.bad(name, format!("expected a non-negative integer, got {n}"))
            })?,
            Some(other) => {
                return Err(self.bad(name, format!("expected a non-negative integer, got {other}")));
            }
        };
        if v < min {
            return Err(self.bad(name, format!("must be at least {min}, got {v}")));
        }
        Ok(v)
    }

    /// [`Kwargs::integer`] as a `usize`.
    pub(crate) fn count(&mut self, name: &'static str, default: u64, min: u64) -> Result<usize> {
        let v = self.integer(name, default, min)?;
        usize::try_from(v).map_err(|_| self.bad(name, format!("{v} is too large")))
    }

    /// Fails on the first kwarg no accessor read; `valid` lists the accepted ones.
    pub(crate) fn finish(self, valid: &[&str]) -> Result<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(name) => Err(Error::UnknownKwarg {
                what: self.what,
                sort: self.sort,
                name: name.clone(),
                valid: if valid.is_empty() { "none".to_owned() } else { valid.join(", ") },
            }),
        }
    }
}

/// Check for [`Kwargs::number`]: finite and strictly positive.
pub(crate) fn positive(v: f64) -> Option<&'static str> {
    (!(v.is_finite() && v > 0.0)).then_some("must be a finite number > 0")
}

/// Check for [`Kwargs::number`]: finite and non-negative.
pub(crate) fn non_negative(v: f64) -> Option<&'static str> {
    (!(v.is_finite() && v >= 0.0)).then_some("must be a finite number >= 0")
}

/// Check for [`Kwargs::number`]: in `[0, 1)`.
pub(crate) fn unit_open(v: f64) -> Option<&'static str> {
    (!(0.0..1.0).contains(&v)).then_some("must be in [0, 1)")
}

/// Check for [`Kwargs::number`]: in `[0, 1]`.
pub(crate) fn unit_closed(v: f64) -> Option<&'static str> {
    (!(0.0..=1.0).contains(&v)).then_some("must be in [0, 1]")
}
