//! Dataset loaders: MNIST IDX (gzip or plain), UCI optical digits CSV, breast-cancer CSV.
//!
//! Every loader returns a [`Dataset`]: row-major `f32` features scaled to `[0, 1]` (MNIST
//! pixels / 255, digits / 16; breast-cancer features are left as they are) and `u8` labels.
//! Files are checked thoroughly: a wrong magic number, a count that does not match the file
//! size or a label out of range is an error naming the file.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// IDX magic of an unsigned-byte 3-D array (images).
const IDX_IMAGES_MAGIC: u32 = 2051;
/// IDX magic of an unsigned-byte 1-D array (labels).
const IDX_LABELS_MAGIC: u32 = 2049;

/// Which part of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training part (`*-train-*`).
    Train,
    /// The held-out test part (`*-test-*`).
    Test,
}

impl Split {
    fn word(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// A labelled data set held in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Row-major features, `len() * dim` values.
    pub features: Vec<f32>,
    /// One label per row.
    pub labels: Vec<u8>,
    /// Features per row.
    pub dim: usize,
    /// Number of classes (labels are `0..classes`).
    pub classes: usize,
}

impl Dataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The rows at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(&self.features[i * self.dim..(i + 1) * self.dim]);
            labels.push(self.labels[i]);
        }
        Dataset { features, labels, dim: self.dim, classes: self.classes }
    }

    /// The first `n` rows (all when `n >= len()`).
    pub fn head(&self, n: usize) -> Dataset {
        let idx: Vec<usize> = (0..n.min(self.len())).collect();
        self.subset(&idx)
    }

    /// Rows per label, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut res = vec![0; self.classes];
        for &l in &self.labels {
            res[l as usize] += 1;
        }
        res
    }
}

/// Reads a whole file, un-gzipping it when it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path)
        .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut res = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut res)
            .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        Ok(res)
    } else {
        Ok(raw)
    }
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn idx_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Format { path: path.display().to_string(), format: "IDX", reason: reason.into() }
}

/// Parses an IDX images file: returns (count, rows, cols, pixels).
pub fn parse_idx_images(path: &Path, bytes: &[u8]) -> Result<(usize, usize, usize, Vec<u8>)> {
    let header =
        |at| be_u32(bytes, at).ok_or_else(|| idx_error(path, "file shorter than its header"));
    let magic = header(0)?;
    if magic != IDX_IMAGES_MAGIC {
        return Err(idx_error(
            path,
            format!("magic {magic}, expected {IDX_IMAGES_MAGIC} (images)"),
        ));
    }
    let (count, rows, cols) = (header(4)? as usize, header(8)? as usize, header(12)? as usize);
    let want = count * rows * cols;
    let body = &bytes[16..];
    if body.len() != want {
        return Err(idx_error(
            path,
            format!(
                "header says {count}×{rows}×{cols} = {want} pixel bytes, file has {}",
                body.len()
            ),
        ));
    }
    Ok((count, rows, cols, body.to_vec()))
}

/// Parses an IDX labels file.
pub fn parse_idx_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let header =
        |at| be_u32(bytes, at).ok_or_else(|| idx_error(path, "file shorter than its header"));
    let magic = header(0)?;
    if magic != IDX_LABELS_MAGIC {
        return Err(idx_error(
            path,
            format!("magic {magic}, expected {IDX_LABELS_MAGIC} (labels)"),
        ));
    }
    let count = header(4)? as usize;
    let body = &bytes[8..];
    if body.len() != count {
        return Err(idx_error(
            path,
            format!("header says {count} labels, file has {}", body.len()),
        ));
    }
    if let Some(bad) = body.iter().find(|&&l| l > 9) {
        return Err(idx_error(path, format!("label {bad} is not a digit 0-9")));
    }
    Ok(body.to_vec())
}

/// Finds `{dir}/{prefix}-{split}-{kind}-idx?-ubyte[.gz]`.
fn find_idx(dir: &Path, split: Split, kind: &str) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir)
        .map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
    let needle = format!("-{}-{kind}-idx", split.word());
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(&needle) || n.starts_with(&needle[1..]))
        })
        .collect();
    found.sort();
    found.into_iter().next().ok_or_else(|| Error::Io {
        path: format!("{}/*{needle}*", dir.display()),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such IDX file"),
    })
}

/// Loads the MNIST `split` from the IDX files in `dir` (`*-train-images-idx3-ubyte[.gz]`,
/// `*-train-labels-idx1-ubyte[.gz]`, same with `test`). Pixels are scaled to `[0, 1]`.
pub fn load_mnist(dir: &Path, split: Split) -> Result<Dataset> {
    let images_path = find_idx(dir, split, "images")?;
    let labels_path = find_idx(dir, split, "labels")?;
    let (count, rows, cols, pixels) =
        parse_idx_images(&images_path, &read_maybe_gz(&images_path)?)?;
    let labels = parse_idx_labels(&labels_path, &read_maybe_gz(&labels_path)?)?;
    if labels.len() != count {
        return Err(idx_error(
            &labels_path,
            format!("{} labels for {count} images in {}", labels.len(), images_path.display()),
        ));
    }
    Ok(Dataset {
        features: pixels.iter().map(|&p| f32::from(p) / 255.0).collect(),
        labels,
        dim: rows * cols,
        classes: 10,
    })
}

fn csv_error(path: &Path, line: usize, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        format: "CSV",
        reason: format!("line {line}: {}", reason.into()),
    }
}

/// Numeric CSV rows, each with its line number.
type Rows = Vec<(usize, Vec<f32>)>;

/// Reads CSV `bytes` (the `csv` crate: quoting, CRLF, blank lines skipped, fields trimmed):
/// the header record when `has_header`, and every row as (line number, numbers).
fn read_csv(
    path: &Path,
    bytes: &[u8],
    has_header: bool,
) -> Result<(Option<csv::StringRecord>, Rows)> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let line_of = |record: &csv::StringRecord| {
        record.position().map_or(0, |p| usize::try_from(p.line()).unwrap_or(usize::MAX))
    };
    let mut header = None;
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|err| {
            let line = err.position().map_or(0, |p| usize::try_from(p.line()).unwrap_or(0));
            csv_error(path, line, err.to_string())
        })?;
        let line_no = line_of(&record);
        if has_header && header.is_none() {
            header = Some(record);
            continue;
        }
        let row = record
            .iter()
            .map(|v| {
                v.parse::<f32>()
                    .map_err(|_| csv_error(path, line_no, format!("{v:?} is not a number")))
            })
            .collect::<Result<Vec<f32>>>()?;
        rows.push((line_no, row));
    }
    Ok((header, rows))
}

/// Splits rows of `dim` features + 1 label into a dataset.
fn rows_to_dataset(
    path: &Path,
    rows: Rows,
    dim: usize,
    classes: usize,
    scale: f32,
) -> Result<Dataset> {
    let mut features = Vec::with_capacity(rows.len() * dim);
    let mut labels = Vec::with_capacity(rows.len());
    for (line_no, row) in rows {
        if row.len() != dim + 1 {
            return Err(csv_error(
                path,
                line_no,
                format!("{} values, expected {} features and a label", row.len(), dim),
            ));
        }
        let label = row[dim];
        if label.fract() != 0.0 || label < 0.0 || label as usize >= classes {
            return Err(csv_error(path, line_no, format!("label {label} is not in 0..{classes}")));
        }
        features.extend(row[..dim].iter().map(|v| v / scale));
        labels.push(label as u8);
    }
    if labels.is_empty() {
        return Err(csv_error(path, 0, "no data rows"));
    }
    Ok(Dataset { features, labels, dim, classes })
}

/// Loads the UCI optical digits CSV (`digits.csv[.gz]`: 64 values 0–16 and a label 0–9 per
/// row, no header). Features are scaled to `[0, 1]`.
pub fn load_digits(path: &Path) -> Result<Dataset> {
    let (_, rows) = read_csv(path, &read_maybe_gz(path)?, false)?;
    rows_to_dataset(path, rows, 64, 10, 16.0)
}

/// Loads the breast-cancer CSV (first line `rows,features,name0,name1`, then rows of 30
/// features and a label 0 = malignant, 1 = benign). Features are not rescaled.
pub fn load_breast_cancer(path: &Path) -> Result<Dataset> {
    let (header, rows) = read_csv(path, &read_maybe_gz(path)?, true)?;
    let header = header.ok_or_else(|| csv_error(path, 1, "empty file"))?;
    let (n_rows, dim) = match (header.get(0), header.get(1)) {
        (Some(rows), Some(dim)) => (
            rows.parse::<usize>()
                .map_err(|_| csv_error(path, 1, format!("row count {rows:?} is not a number")))?,
            dim.parse::<usize>().map_err(|_| {
                csv_error(path, 1, format!("feature count {dim:?} is not a number"))
            })?,
        ),
        _ => return Err(csv_error(path, 1, "header must be rows,features,names...")),
    };
    if rows.len() != n_rows {
        return Err(csv_error(
            path,
            1,
            format!("header says {n_rows} rows, file has {}", rows.len()),
        ));
    }
    rows_to_dataset(path, rows, dim, 2, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn data_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data")
    }

    #[test]
    fn loads_real_mnist_train_and_test() {
        let train = load_mnist(&data_dir(), Split::Train).expect("train loads");
        let test = load_mnist(&data_dir(), Split::Test).expect("test loads");
        assert_eq!((train.len(), train.dim), (8000, 784));
        assert_eq!(test.len(), 2000);
        assert!(train.features.iter().all(|v| (0.0..=1.0).contains(v)));
        // Every digit is present in a real MNIST sample of this size, roughly balanced.
        let counts = train.class_counts();
        assert!(counts.iter().all(|&c| c > 600 && c < 1000), "{counts:?}");
        assert!(train.features.contains(&1.0));
    }

    #[test]
    fn loads_real_csv_sets() {
        let digits = load_digits(&data_dir().join("digits.csv.gz")).expect("digits load");
        assert_eq!((digits.len(), digits.dim, digits.classes), (1797, 64, 10));
        assert!(digits.features.iter().all(|v| (0.0..=1.0).contains(v)));
        let bc = load_breast_cancer(&data_dir().join("breast_cancer.csv")).expect("bc loads");
        assert_eq!((bc.len(), bc.dim, bc.classes), (569, 30, 2));
        assert_eq!(bc.class_counts(), vec![212, 357]);
    }

    #[test]
    fn rejects_bad_files_with_clear_errors() {
        let dir = std::env::temp_dir().join(format!("fledge-models-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let p = dir.join("x-train-images-idx3-ubyte");
        std::fs::write(&p, [0, 0, 8, 1, 0, 0, 0, 1]).expect("write");
        let err = parse_idx_images(&p, &std::fs::read(&p).expect("read")).unwrap_err();
        assert!(err.to_string().contains("IDX"), "{err}");
        let mut short = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
        short.extend([0u8; 784]);
        let err = parse_idx_images(&p, &short).unwrap_err();
        assert!(format!("{err}").contains("x-train-images"), "{err}");
        let labels = [0, 0, 8, 1, 0, 0, 0, 2, 3, 12];
        let err = parse_idx_labels(&p, &labels).unwrap_err();
        assert!(
            matches!(&err, Error::Format { reason, .. } if reason.contains("label 12")),
            "{err}"
        );
        let csv = dir.join("bad.csv");
        std::fs::write(&csv, "1,2,x\n").expect("write");
        let quoted = dir.join("quoted.csv");
        let row = (0..64).map(|i| format!("\"{}\"", i % 17)).collect::<Vec<_>>().join(",");
        std::fs::write(&quoted, format!("{row},3\r\n\r\n{row},4\r\n")).expect("write");
        let parsed = load_digits(&quoted).expect("quoted fields, CRLF and blank lines parse");
        assert_eq!(parsed.labels, [3, 4]);
        let short = dir.join("short.csv");
        std::fs::write(&short, format!("{row},3\n1,2\n")).expect("write");
        let err = load_digits(&short).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("2 values"), "{err}");
        let err = load_digits(&csv).unwrap_err();
        assert!(matches!(&err, Error::Format { reason, .. } if reason.contains("line 1")), "{err}");
        let err = load_mnist(&dir.join("missing"), Split::Test).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
