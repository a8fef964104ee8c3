//! The tables of vertical FL: one CSV file per party, every row keyed by a sample id.
//!
//! ```text
//! id,mean_radius,mean_texture,...        a feature party: the id and its columns
//! patient-042,17.99,10.38,...
//!
//! id,label                               the label party: the id, the label (0..classes),
//! patient-042,0                          and maybe feature columns of its own
//! ```
//!
//! The id column (`idColumn`, default `id`) and the label column (`labelColumn`, default
//! `label`) may be anywhere in the header; every other column is a feature. Ids are unique
//! within a file; the row order is the party's own business: parties align by id.
//!
//! [`example_party_files`] derives the three files of `examples/vertical-breast-cancer/data/`
//! from `examples/data/breast_cancer.csv`: sample ids `patient-000`..`patient-568` (the row
//! number), features 0–14 to party A, 15–29 to party B, the labels to the label party; each
//! file drops a few ids and shuffles its rows with its own seed, so that alignment has work
//! to do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::data::Dataset;
use crate::{Error, Result};

/// The column names of the breast-cancer features, in the file's order (scikit-learn's names
/// in snake case).
pub const BREAST_CANCER_COLUMNS: [&str; 30] = [
    "mean_radius",
    "mean_texture",
    "mean_perimeter",
    "mean_area",
    "mean_smoothness",
    "mean_compactness",
    "mean_concavity",
    "mean_concave_points",
    "mean_symmetry",
    "mean_fractal_dimension",
    "radius_error",
    "texture_error",
    "perimeter_error",
    "area_error",
    "smoothness_error",
    "compactness_error",
    "concavity_error",
    "concave_points_error",
    "symmetry_error",
    "fractal_dimension_error",
    "worst_radius",
    "worst_texture",
    "worst_perimeter",
    "worst_area",
    "worst_smoothness",
    "worst_compactness",
    "worst_concavity",
    "worst_concave_points",
    "worst_symmetry",
    "worst_fractal_dimension",
];

/// One party's table.
#[derive(Clone, Debug, PartialEq)]
pub struct PartyTable {
    /// The file it came from.
    pub path: PathBuf,
    /// Sample ids, in file order.
    pub ids: Vec<String>,
    /// Feature column names.
    pub columns: Vec<String>,
    /// Row-major features, `ids.len() * columns.len()` values.
    pub features: Vec<f32>,
    /// One label per row (the label party only).
    pub labels: Option<Vec<u8>>,
}

/// Rows of a table in a given id order.
#[derive(Clone, Debug, PartialEq)]
pub struct Rows {
    /// Row-major features.
    pub features: Vec<f32>,
    /// Labels, if the table has them.
    pub labels: Option<Vec<u8>>,
}

fn format_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Format { path: path.display().to_string(), format: "CSV", reason: reason.into() }
}

/// The file a party's dataset URL names: `file:///abs/file.csv` or `/abs/file.csv`
/// (percent-decoded: `my%20party.csv` is `my party.csv`).
pub fn table_path(url: &str) -> Result<PathBuf> {
    let bad = |reason: String| Error::Url { url: url.to_owned(), reason };
    if url.contains('?') {
        return Err(bad("a party table takes no query (name the CSV file itself)".to_owned()));
    }
    let path = match url.split_once("://") {
        Some(("file", rest)) => rest,
        Some((scheme, _)) => {
            return Err(bad(format!(
                "scheme {scheme:?} is not supported (use file:///abs/file.csv)"
            )));
        }
        None => url,
    };
    let path = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| bad(format!("path {path:?} is not UTF-8 once percent-decoded")))?;
    if !path.starts_with('/') {
        return Err(bad(format!("path {path:?} is not absolute")));
    }
    Ok(PathBuf::from(path.as_ref()))
}

impl PartyTable {
    /// Loads a party's CSV. `label_column` is `Some` for the label party, whose table must
    /// hold labels in `0..classes`; `None` makes every non-id column a feature.
    pub fn load(
        path: &Path,
        id_column: &str,
        label_column: Option<&str>,
        classes: usize,
    ) -> Result<PartyTable> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        PartyTable::parse(path, &text, id_column, label_column, classes)
    }

    /// Parses a party's CSV text (see [`PartyTable::load`]); `path` names it in errors.
    pub fn parse(
        path: &Path,
        text: &str,
        id_column: &str,
        label_column: Option<&str>,
        classes: usize,
    ) -> Result<PartyTable> {
        // The `csv` crate: quoted fields, CRLF, blank lines skipped, fields trimmed.
        let mut records = Vec::new();
        for record in csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes())
            .into_records()
        {
            let record = record.map_err(|err| format_error(path, err.to_string()))?;
            let line = record.position().map_or(0, |p| usize::try_from(p.line()).unwrap_or(0));
            records.push((line, record));
        }
        let mut lines = records.iter().map(|(line, record)| (*line, record));
        let (_, header) = lines.next().ok_or_else(|| format_error(path, "empty file"))?;
        let header: Vec<&str> = header.iter().collect();
        let listed = || header.join(", ");
        let id_at = header.iter().position(|c| *c == id_column).ok_or_else(|| {
            format_error(
                path,
                format!("no id column {id_column:?} in the header (columns: {})", listed()),
            )
        })?;
        let label_at = match label_column {
            None => None,
            Some(name) => Some(header.iter().position(|c| *c == name).ok_or_else(|| {
                format_error(
                    path,
                    format!(
                        "no label column {name:?} in the header: the label party's table must \
                         hold the labels (columns: {})",
                        listed()
                    ),
                )
            })?),
        };
        let feature_at: Vec<usize> =
            (0..header.len()).filter(|i| *i != id_at && Some(*i) != label_at).collect();
        if label_at.is_none() && feature_at.is_empty() {
            return Err(format_error(path, "a feature party's table has no feature column"));
        }
        let mut res = PartyTable {
            path: path.to_owned(),
            ids: Vec::new(),
            columns: feature_at.iter().map(|&i| header[i].to_owned()).collect(),
            features: Vec::new(),
            labels: label_at.map(|_| Vec::new()),
        };
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (line_no, record) in lines {
            let at = |reason: String| format_error(path, format!("line {line_no}: {reason}"));
            let fields: Vec<&str> = record.iter().collect();
            if fields.len() != header.len() {
                return Err(at(format!(
                    "{} fields, the header has {}",
                    fields.len(),
                    header.len()
                )));
            }
            let id = fields[id_at];
            if id.is_empty() {
                return Err(at("empty sample id".to_owned()));
            }
            if let Some(first) = seen.insert(id.to_owned(), line_no) {
                return Err(at(format!("sample id {id:?} already on line {first}")));
            }
            for &c in &feature_at {
                let v =
                    fields[c].parse::<f32>().ok().filter(|v| v.is_finite()).ok_or_else(|| {
                        at(format!("{}={:?} is not a finite number", header[c], fields[c]))
                    })?;
                res.features.push(v);
            }
            if let (Some(l), Some(labels)) = (label_at, res.labels.as_mut()) {
                let label =
                    fields[l].parse::<usize>().ok().filter(|v| *v < classes).ok_or_else(|| {
                        at(format!("label {:?} is not in 0..{classes}", fields[l]))
                    })?;
                labels.push(label as u8);
            }
            res.ids.push(id.to_owned());
        }
        if res.ids.is_empty() {
            return Err(format_error(path, "no data rows"));
        }
        Ok(res)
    }

    /// Features per row.
    pub fn dim(&self) -> usize {
        self.columns.len()
    }

    /// The rows of `ids`, in that order; every id must be in the table.
    pub fn select(&self, ids: &[String]) -> Result<Rows> {
        let index: HashMap<&str, usize> =
            self.ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
        let dim = self.dim();
        let mut features = Vec::with_capacity(ids.len() * dim);
        let mut labels = self.labels.as_ref().map(|_| Vec::with_capacity(ids.len()));
        for id in ids {
            let &row = index.get(id.as_str()).ok_or_else(|| {
                format_error(&self.path, format!("sample id {id:?} is not in the table"))
            })?;
            features.extend_from_slice(&self.features[row * dim..(row + 1) * dim]);
            if let (Some(out), Some(all)) = (labels.as_mut(), self.labels.as_ref()) {
                out.push(all[row]);
            }
        }
        Ok(Rows { features, labels })
    }
}

/// Per-column mean and standard deviation of some rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Standardizer {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Standardizer {
    /// Statistics of `rows` (row-major, `dim` columns). A constant column keeps scale 1.
    pub fn fit(rows: &[f32], dim: usize) -> Standardizer {
        let n = (rows.len() / dim.max(1)).max(1) as f64;
        let mut mean = vec![0f64; dim];
        let mut sq = vec![0f64; dim];
        for row in rows.chunks(dim.max(1)) {
            for (c, v) in row.iter().enumerate() {
                mean[c] += f64::from(*v);
            }
        }
        mean.iter_mut().for_each(|m| *m /= n);
        for row in rows.chunks(dim.max(1)) {
            for (c, v) in row.iter().enumerate() {
                sq[c] += (f64::from(*v) - mean[c]).powi(2);
            }
        }
        let std = sq
            .iter()
            .map(|s| {
                let s = (s / n).sqrt();
                if s > 1e-12 { s as f32 } else { 1.0 }
            })
            .collect();
        Standardizer { mean: mean.into_iter().map(|m| m as f32).collect(), std }
    }

    /// Standardises `rows` in place.
    pub fn apply(&self, rows: &mut [f32]) {
        let dim = self.mean.len().max(1);
        for row in rows.chunks_mut(dim) {
            for ((v, m), s) in row.iter_mut().zip(&self.mean).zip(&self.std) {
                *v = (*v - m) / s;
            }
        }
    }
}

/// The sample id of row `i` of the breast-cancer CSV.
pub fn sample_id(i: usize) -> String {
    format!("patient-{i:03}")
}

/// One file of [`example_party_files`].
struct PartySpec {
    file: &'static str,
    columns: std::ops::Range<usize>,
    labels: bool,
    dropped: usize,
    seed: u64,
}

const EXAMPLE_PARTIES: [PartySpec; 3] = [
    PartySpec { file: "features-a.csv", columns: 0..15, labels: false, dropped: 3, seed: 11 },
    PartySpec { file: "features-b.csv", columns: 15..30, labels: false, dropped: 4, seed: 12 },
    PartySpec { file: "labels.csv", columns: 0..0, labels: true, dropped: 2, seed: 13 },
];

/// The party files of the vertical example (file name, CSV text) from the breast-cancer
/// data set: see the module documentation.
pub fn example_party_files(source: &Dataset) -> Vec<(&'static str, String)> {
    EXAMPLE_PARTIES
        .iter()
        .map(|spec| {
            let mut rows: Vec<usize> = (0..source.len()).collect();
            rows.shuffle(&mut StdRng::seed_from_u64(spec.seed));
            rows.truncate(source.len() - spec.dropped);
            let mut text = String::from("id");
            for c in spec.columns.clone() {
                text.push(',');
                text.push_str(BREAST_CANCER_COLUMNS[c]);
            }
            if spec.labels {
                text.push_str(",label");
            }
            text.push('\n');
            for i in rows {
                text.push_str(&sample_id(i));
                for c in spec.columns.clone() {
                    text.push_str(&format!(",{}", source.features[i * source.dim + c]));
                }
                if spec.labels {
                    text.push_str(&format!(",{}", source.labels[i]));
                }
                text.push('\n');
            }
            (spec.file, text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::load_breast_cancer;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The committed files are what [`example_party_files`] makes of the source CSV
    /// (`UPDATE_EXPECT=1` rewrites them).
    #[test]
    fn example_party_files_are_derived_from_the_source_csv() {
        let source = load_breast_cancer(&repo().join("examples/data/breast_cancer.csv"))
            .expect("source loads");
        let dir = repo().join("examples/vertical-breast-cancer/data");
        for (file, text) in example_party_files(&source) {
            let path = dir.join(file);
            if std::env::var_os("UPDATE_EXPECT").is_some() {
                std::fs::create_dir_all(&dir).expect("data dir");
                std::fs::write(&path, &text).expect("write");
            }
            let committed = std::fs::read_to_string(&path).expect("committed party file");
            assert!(committed == text, "{} differs from its derivation", path.display());
        }
    }

    #[test]
    fn shuffled_tables_select_the_source_rows_by_id() {
        let source = load_breast_cancer(&repo().join("examples/data/breast_cancer.csv"))
            .expect("source loads");
        let dir = repo().join("examples/vertical-breast-cancer/data");
        let a = PartyTable::load(&dir.join("features-a.csv"), "id", None, 2).expect("a");
        let b = PartyTable::load(&dir.join("features-b.csv"), "id", None, 2).expect("b");
        let l = PartyTable::load(&dir.join("labels.csv"), "id", Some("label"), 2).expect("l");
        assert_eq!((a.dim(), b.dim(), l.dim()), (15, 15, 0));
        assert_eq!((a.ids.len(), b.ids.len(), l.ids.len()), (566, 565, 567));
        // Each file has its own order.
        assert_ne!(a.ids[..20], b.ids[..20]);
        let wanted: Vec<String> = [7, 0, 568, 300].iter().map(|&i| sample_id(i)).collect();
        let present: Vec<String> = wanted
            .iter()
            .filter(|id| a.ids.contains(id) && b.ids.contains(id) && l.ids.contains(id))
            .cloned()
            .collect();
        assert!(present.len() >= 3, "{present:?}");
        let (ra, rb, rl) = (
            a.select(&present).expect("a rows"),
            b.select(&present).expect("b rows"),
            l.select(&present).expect("l rows"),
        );
        for (k, id) in present.iter().enumerate() {
            let i: usize = id["patient-".len()..].parse().expect("numbered id");
            let row = &source.features[i * 30..(i + 1) * 30];
            assert_eq!(&ra.features[k * 15..(k + 1) * 15], &row[..15], "{id}");
            assert_eq!(&rb.features[k * 15..(k + 1) * 15], &row[15..], "{id}");
            assert_eq!(rl.labels.as_ref().expect("labels")[k], source.labels[i], "{id}");
        }
        let err = a.select(&["nobody".to_owned()]).unwrap_err().to_string();
        assert!(err.contains("\"nobody\""), "{err}");
    }

    #[test]
    fn bad_tables_get_errors_naming_the_problem() {
        let p = Path::new("/data/party.csv");
        let parse = |text: &str, label: Option<&str>| {
            PartyTable::parse(p, text, "id", label, 2).unwrap_err().to_string()
        };
        for (text, label, needle) in [
            ("sample,x\na,1\n", None, "no id column \"id\""),
            ("id,x\na,1\n", Some("label"), "no label column \"label\""),
            ("id\na\n", None, "no feature column"),
            ("id,x\na,1\na,2\n", None, "sample id \"a\" already on line 2"),
            ("id,x\na,1,2\n", None, "line 2: 3 fields"),
            ("id,x\na,abc\n", None, "x=\"abc\""),
            ("id,label\na,2\n", Some("label"), "label \"2\" is not in 0..2"),
            ("id,x\n", None, "no data rows"),
            ("", None, "empty file"),
            ("id,x\n,1\n", None, "empty sample id"),
        ] {
            let err = parse(text, label);
            assert!(err.contains(needle) && err.contains("party.csv"), "{text:?}: {err}");
        }
        let ok = PartyTable::parse(p, "x,id,label\n1.5,a,1\n", "id", Some("label"), 2)
            .expect("columns in any order");
        assert_eq!((ok.columns.clone(), ok.features.clone()), (vec!["x".to_owned()], vec![1.5]));
        assert_eq!(ok.labels, Some(vec![1]));
        for (url, needle) in [
            ("http://x/a.csv", "scheme"),
            ("file://rel/a.csv", "absolute"),
            ("/d/a.csv?limit=3", "no query"),
        ] {
            let err = table_path(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
        assert_eq!(table_path("file:///d/a.csv").expect("ok"), PathBuf::from("/d/a.csv"));
    }

    #[test]
    fn standardizer_uses_the_rows_it_was_fitted_on() {
        let s = Standardizer::fit(&[1.0, 5.0, 3.0, 5.0], 2);
        let mut rows = vec![1.0, 5.0, 3.0, 5.0, 5.0, 7.0];
        s.apply(&mut rows);
        assert_eq!(rows, vec![-1.0, 0.0, 1.0, 0.0, 3.0, 2.0]);
    }
}
