//! The dataset URL convention of the reference trainers.
//!
//! ```text
//! file:///abs/dir[?shard=i&shards=n&partition=iid|dirichlet&alpha=0.3&seed=0&limit=m]
//! ```
//!
//! - The path is a directory holding the MNIST IDX files (`*-train-images-idx3-ubyte[.gz]`,
//!   `*-train-labels-idx1-ubyte[.gz]` and the same with `test`). A bare absolute path (no
//!   scheme) is accepted too.
//! - `shard`/`shards` select shard `i` (0-based) of `n` of the training set; without them the
//!   whole training set is used. `partition` is `iid` (default) or `dirichlet` with `alpha`
//!   (default 0.5). `seed` (default 0) drives the split: every trainer of a job must use the
//!   same seed so that the shards are disjoint.
//! - `limit` keeps only the first `m` training rows before partitioning (quick tests).
//! - The test set (`*-test-*`) is used for evaluation, whole.
//! - The path and every query key and value are percent-decoded (`my%20data` is `my data`); a
//!   key given twice is an error.

use std::path::PathBuf;

use crate::{Error, Result};

/// How the training set is split across trainers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    /// Shuffled round-robin.
    Iid,
    /// Dirichlet(alpha) label skew.
    Dirichlet {
        /// Concentration (> 0); smaller is more skewed.
        alpha: f64,
    },
}

/// A parsed dataset URL.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetUrl {
    /// The directory with the IDX files.
    pub dir: PathBuf,
    /// `(shard, shards)`, or `None` for the whole training set.
    pub shard: Option<(usize, usize)>,
    /// The split rule.
    pub partition: Partition,
    /// Seed of the split.
    pub seed: u64,
    /// Keep only the first rows of the training set.
    pub limit: Option<usize>,
}

impl DatasetUrl {
    /// Parses `url`; every problem names the offending part.
    pub fn parse(url: &str) -> Result<DatasetUrl> {
        let bad = |reason: String| Error::Url { url: url.to_owned(), reason };
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, q),
            None => (url, ""),
        };
        let decode = |part: &str, what: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|_| bad(format!("{what} {part:?} is not UTF-8 once percent-decoded")))
        };
        let path = match path.split_once("://") {
            Some(("file", rest)) => rest,
            Some((scheme, _)) => {
                return Err(bad(format!(
                    "scheme {scheme:?} is not supported (use file:///abs/dir)"
                )));
            }
            None => path,
        };
        let path = decode(path, "path")?;
        if !path.starts_with('/') {
            return Err(bad(format!("path {path:?} is not absolute")));
        }
        let mut seen = std::collections::HashSet::new();
        let mut shard = None;
        let mut shards = None;
        let mut partition = "iid".to_owned();
        let mut alpha = 0.5;
        let mut seed = 0;
        let mut limit = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("query part {pair:?} is not key=value")))?;
            let (key, value) = (decode(key, "query key")?, decode(value, "query value")?);
            let (key, value) = (key.as_str(), value.as_str());
            if !seen.insert(key.to_owned()) {
                return Err(bad(format!("query key {key:?} is given twice")));
            }
            let int = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{key}={v:?} is not a non-negative integer")))
            };
            match key {
                "shard" => shard = Some(int(value)? as usize),
                "shards" => shards = Some(int(value)? as usize),
                "partition" => partition = value.to_owned(),
                "alpha" => {
                    alpha = value
                        .parse::<f64>()
                        .ok()
                        .filter(|a| a.is_finite() && *a > 0.0)
                        .ok_or_else(|| bad(format!("alpha={value:?} is not a positive number")))?;
                }
                "seed" => seed = int(value)?,
                "limit" => limit = Some(int(value)? as usize),
                other => {
                    return Err(bad(format!(
                        "unknown query key {other:?} (shard, shards, partition, alpha, seed, limit)"
                    )));
                }
            }
        }
        let shard = match (shard, shards) {
            (None, None) => None,
            (Some(i), Some(n)) if n >= 1 && i < n => Some((i, n)),
            (Some(i), Some(n)) => {
                return Err(bad(format!("shard={i} is not in 0..shards={n}")));
            }
            _ => return Err(bad("shard and shards must be given together".to_owned())),
        };
        let partition = match partition.as_str() {
            "iid" => Partition::Iid,
            "dirichlet" => Partition::Dirichlet { alpha },
            other => {
                return Err(bad(format!("partition={other:?} is not iid or dirichlet")));
            }
        };
        Ok(DatasetUrl { dir: PathBuf::from(path), shard, partition, seed, limit })
    }

    /// The URL of shard `shard` of `shards` of `dir` (the form the simulators generate).
    pub fn for_shard(
        dir: &std::path::Path,
        shard: usize,
        shards: usize,
        partition: Partition,
        seed: u64,
    ) -> String {
        let part = match partition {
            Partition::Iid => "partition=iid".to_owned(),
            Partition::Dirichlet { alpha } => format!("partition=dirichlet&alpha={alpha}"),
        };
        // Encode what the parser decodes, so any directory name round-trips.
        const PATH: &percent_encoding::AsciiSet =
            &percent_encoding::CONTROLS.add(b' ').add(b'%').add(b'?').add(b'#').add(b'&');
        let dir = percent_encoding::utf8_percent_encode(&dir.to_string_lossy(), PATH).to_string();
        format!("file://{dir}?shard={shard}&shards={shards}&{part}&seed={seed}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let u = DatasetUrl::parse(
            "file:///data/mnist?shard=2&shards=10&partition=dirichlet&alpha=0.3&seed=4",
        )
        .expect("valid");
        assert_eq!(u.dir, PathBuf::from("/data/mnist"));
        assert_eq!(u.shard, Some((2, 10)));
        assert_eq!(u.partition, Partition::Dirichlet { alpha: 0.3 });
        assert_eq!(u.seed, 4);
        let whole = DatasetUrl::parse("/data/mnist").expect("bare path");
        assert_eq!((whole.shard, whole.partition), (None, Partition::Iid));
        let url = DatasetUrl::for_shard(&PathBuf::from("/d"), 1, 3, Partition::Iid, 0);
        assert_eq!(DatasetUrl::parse(&url).expect("round trip").shard, Some((1, 3)));
    }

    #[test]
    fn paths_and_queries_are_percent_decoded() {
        let u = DatasetUrl::parse("file:///data/my%20mnist%3F?shard=1&shards=%32&see%64=7")
            .expect("valid once decoded");
        assert_eq!(u.dir, PathBuf::from("/data/my mnist?"));
        assert_eq!((u.shard, u.seed), (Some((1, 2)), 7));
        let odd = PathBuf::from("/data/a b%c?d#e&f");
        let url = DatasetUrl::for_shard(&odd, 0, 2, Partition::Iid, 0);
        assert_eq!(DatasetUrl::parse(&url).expect("round trip").dir, odd);
        let err = DatasetUrl::parse("/d?seed=1&seed=2").unwrap_err().to_string();
        assert!(err.contains("given twice"), "{err}");
        let err = DatasetUrl::parse("/d%ff").unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn rejects_bad_urls_naming_the_part() {
        for (url, needle) in [
            ("http://x/y", "scheme"),
            ("file://rel/dir", "absolute"),
            ("/d?shard=3&shards=3", "shard=3"),
            ("/d?shard=1", "together"),
            ("/d?partition=zipf", "zipf"),
            ("/d?alpha=-1", "alpha"),
            ("/d?colour=red", "colour"),
            ("/d?seed=x", "seed"),
        ] {
            let err = DatasetUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }
}
