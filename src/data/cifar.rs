//! Readers for the official CIFAR binary archives.
//!
//! CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_1.bin` .. `data_batch_5.bin` (train) and
//! `test_batch.bin`, records of one label byte and 3072 pixel bytes. CIFAR-100
//! (`cifar-100-binary/`): `train.bin` and `test.bin`, records of a coarse and a fine label byte
//! and 3072 pixel bytes; the fine label is used. Pixels are three 32x32 planes, R, G, B, row
//! by row. Any whole number of records per file is accepted.

use crate::named::{by_name, Named};
use crate::{bail, Error, Result};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Image height and width.
pub const SIDE: usize = 32;

/// Bytes (and network input floats) per image: 3 planes of 32x32.
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;

/// Bytes read at a time from a data file.
const READ_BUFFER: usize = 1 << 20;

/// Where the official archives are published.
const HOME: &str = "https://www.cs.toronto.edu/~kriz/cifar.html";

/// Which CIFAR dataset (`"cifar10"` or `"cifar100"` in JSON, as on the command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dataset {
    /// CIFAR-10: 10 classes.
    Cifar10,
    /// CIFAR-100: 100 fine classes (20 coarse ones are read and checked, not used).
    Cifar100,
}

/// Training or test images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training files.
    Train,
    /// The test file.
    Test,
}

impl Dataset {
    /// Classes the network predicts.
    pub fn classes(self) -> usize {
        match self {
            Dataset::Cifar10 => 10,
            Dataset::Cifar100 => 100,
        }
    }

    /// The usual spelling, `CIFAR-10` or `CIFAR-100`.
    pub fn title(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "CIFAR-10",
            Dataset::Cifar100 => "CIFAR-100",
        }
    }

    /// The folder the official archive extracts to.
    pub fn folder(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "cifar-10-batches-bin",
            Dataset::Cifar100 => "cifar-100-binary",
        }
    }

    /// The folder of the Python version of the archive, a common mistake.
    fn python_folder(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "cifar-10-batches-py",
            Dataset::Cifar100 => "cifar-100-python",
        }
    }

    /// The official archive's file name.
    pub fn archive(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "cifar-10-binary.tar.gz",
            Dataset::Cifar100 => "cifar-100-binary.tar.gz",
        }
    }

    /// The files of one split.
    pub fn files(self, split: Split) -> &'static [&'static str] {
        match (self, split) {
            (Dataset::Cifar10, Split::Train) => {
                &["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"]
            }
            (Dataset::Cifar10, Split::Test) => &["test_batch.bin"],
            (Dataset::Cifar100, Split::Train) => &["train.bin"],
            (Dataset::Cifar100, Split::Test) => &["test.bin"],
        }
    }

    /// The expected files, as a short phrase for messages.
    fn file_list(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "data_batch_1.bin .. data_batch_5.bin and test_batch.bin",
            Dataset::Cifar100 => "train.bin and test.bin",
        }
    }

    /// Label bytes before each image, and the class count each must be below (the last one is
    /// the label trained on).
    fn label_bytes(self) -> &'static [(&'static str, u8)] {
        match self {
            Dataset::Cifar10 => &[("label", 10)],
            Dataset::Cifar100 => &[("coarse label", 20), ("fine label", 100)],
        }
    }

    /// Bytes per record.
    pub fn record_bytes(self) -> usize {
        self.label_bytes().len() + IMAGE_BYTES
    }
}

impl Named for Dataset {
    const WHAT: &'static str = "dataset";
    const VALUES: &'static [Dataset] = &[Dataset::Cifar10, Dataset::Cifar100];
    const LOOSE: bool = true;

    fn name(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "cifar10",
            Dataset::Cifar100 => "cifar100",
        }
    }
}

by_name!(Dataset, serde);

/// Labeled images kept as bytes: `len()` images of [`IMAGE_BYTES`] (R, G, B planes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Images {
    pixels: Vec<u8>,
    labels: Vec<u32>,
}

impl Images {
    /// Reads one split of `dataset` from `dir`, which holds the archive's folder or its files.
    pub fn load(dir: &Path, dataset: Dataset, split: Split) -> Result<Images> {
        let root = locate(dir, dataset)?;
        let record = dataset.record_bytes() as u64;
        let mut files = Vec::new();
        for name in dataset.files(split) {
            let path = root.join(name);
            let size = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => m.len(),
                Ok(_) => bail!("{}: not a file", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                    "missing {} file {} (the official archive {} holds {})",
                    dataset.title(),
                    path.display(),
                    dataset.archive(),
                    dataset.file_list()
                ),
                Err(e) => bail!("{}: {e}", path.display()),
            };
            if size == 0 || size % record != 0 {
                bail!(
                    "{}: {size} bytes is not a whole, non-zero number of {record}-byte {} records \
                     (truncated, or not a {} file)",
                    path.display(),
                    dataset.title(),
                    dataset.title()
                );
            }
            files.push((path, (size / record) as usize));
        }
        let total: usize = files.iter().map(|f| f.1).sum();
        let mut images = Images::with_capacity(0);
        if images.pixels.try_reserve_exact(total.saturating_mul(IMAGE_BYTES)).is_err() {
            let first = files.first().map_or_else(String::new, |f| f.0.display().to_string());
            bail!("{first}: the {total} images of this data set do not fit in memory");
        }
        images.labels.reserve_exact(total);
        for (path, records) in files {
            let file = File::open(&path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
            images.append(BufReader::with_capacity(READ_BUFFER, file), records, dataset, &path)?;
        }
        Ok(images)
    }

    /// No images yet, with room for `records`.
    pub(crate) fn with_capacity(records: usize) -> Images {
        Images { pixels: Vec::with_capacity(records * IMAGE_BYTES), labels: Vec::with_capacity(records) }
    }

    /// Appends `records` records of `dataset` read from `r`; `path` names the source in errors.
    pub(crate) fn append(&mut self, mut r: impl Read, records: usize, dataset: Dataset, path: &Path) -> Result<()> {
        let fields = dataset.label_bytes();
        let mut label = [0u8; 2];
        let label = &mut label[..fields.len()];
        for i in 0..records {
            let start = self.pixels.len();
            self.pixels.resize(start + IMAGE_BYTES, 0);
            r.read_exact(label)
                .and_then(|()| r.read_exact(&mut self.pixels[start..]))
                .map_err(|e| Error(format!("{}: record {i}: {e}", path.display())))?;
            for (&(what, classes), &l) in fields.iter().zip(label.iter()) {
                if l >= classes {
                    bail!(
                        "{}: record {i} has {what} {l}, outside 0..{classes} (not a {} file?)",
                        path.display(),
                        dataset.title()
                    );
                }
            }
            self.labels.push(label[fields.len() - 1] as u32);
        }
        Ok(())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i`: [`IMAGE_BYTES`] bytes, R, G, B planes of 32x32.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Every label, one per image.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }
}

/// The folder holding `dataset`'s files: `dir/<archive folder>` when it exists, else `dir`
/// itself when it holds any of the files.
fn locate(dir: &Path, dataset: Dataset) -> Result<PathBuf> {
    let nested = dir.join(dataset.folder());
    if nested.is_dir() {
        return Ok(nested);
    }
    let splits = [Split::Train, Split::Test];
    if splits.iter().flat_map(|&s| dataset.files(s)).any(|f| dir.join(f).is_file()) {
        return Ok(dir.to_path_buf());
    }
    let python = dir.join(dataset.python_folder());
    let found = if python.is_dir() { format!("; {} is the Python version", python.display()) } else { String::new() };
    bail!(
        "{} not found in {}: expected {}/ holding {} (or those files directly in it){found}; add \
         --download to fetch it (or run densenet download --data-dir {}), give a local copy of the \
         binary archive with densenet download --archive PATH, or get {} from {HOME} and extract it there",
        dataset.title(),
        dir.display(),
        nested.display(),
        dataset.file_list(),
        dir.display(),
        dataset.archive()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::records;

    fn parse(bytes: &[u8], dataset: Dataset) -> Result<Images> {
        let n = bytes.len() / dataset.record_bytes();
        let mut images = Images::with_capacity(n);
        images.append(bytes, n, dataset, Path::new("x.bin"))?;
        Ok(images)
    }

    /// Fuzzing the record reader: valid CIFAR-10 and CIFAR-100 records with random label bytes,
    /// flipped pixels and truncation, a fixed seeded budget: no panic, every rejection one line
    /// naming the file and the record.
    #[test]
    fn fuzzed_records_are_one_line_errors_never_panics() {
        const CASES: u64 = 20_000;
        let mut accepted = 0;
        for case in 0..CASES {
            let r = |k: u64| crate::rng::derive(crate::rng::derive(0xc1fa, case), k);
            let dataset = if r(0) % 2 == 0 { Dataset::Cifar10 } else { Dataset::Cifar100 };
            let mut bytes = records(dataset, 3);
            for k in 0..1 + r(1) % 3 {
                let at = (r(2 + k) % bytes.len() as u64) as usize;
                bytes[at] = r(10 + k) as u8;
            }
            bytes.truncate(bytes.len() - (r(20) % 2 * (r(21) % bytes.len() as u64)) as usize);
            let records = bytes.len().div_ceil(dataset.record_bytes());
            let mut images = Images::with_capacity(records);
            match std::panic::catch_unwind(move || images.append(&bytes[..], records, dataset, Path::new("x.bin"))) {
                Err(_) => panic!("case {case} panicked"),
                Ok(Ok(())) => accepted += 1,
                Ok(Err(e)) => assert!(!e.0.contains('\n') && e.0.starts_with("x.bin: record "), "case {case}: {e}"),
            }
        }
        crate::testing::Tally { parser: "CIFAR records", cases: CASES, counts: vec![accepted] }.check();
    }

    #[test]
    fn cifar10_records() {
        let mut bytes = records(Dataset::Cifar10, 3);
        bytes[1 + 3072 + 1 + 5] = 200; // image 1, red plane, pixel (0, 5)
        let im = parse(&bytes, Dataset::Cifar10).unwrap();
        assert_eq!(im.len(), 3);
        assert_eq!(im.labels(), &[0, 1, 2]);
        assert_eq!(im.image(2), &[2u8; IMAGE_BYTES][..]);
        assert_eq!(im.image(1)[5], 200);
        assert_eq!(im.image(1)[4], 1);
    }

    #[test]
    fn cifar100_uses_fine_labels() {
        let mut bytes = records(Dataset::Cifar100, 2);
        bytes[0] = 7;
        bytes[1] = 93;
        let im = parse(&bytes, Dataset::Cifar100).unwrap();
        assert_eq!(im.labels(), &[93, 1]);
        assert_eq!(im.image(1), &[1u8; IMAGE_BYTES][..]);
    }

    #[test]
    fn bad_labels_name_the_record() {
        let mut bytes = records(Dataset::Cifar10, 2);
        bytes[3073] = 10;
        let e = parse(&bytes, Dataset::Cifar10).unwrap_err().0;
        assert!(e.contains("x.bin: record 1 has label 10, outside 0..10"), "{e}");
        let mut bytes = records(Dataset::Cifar100, 1);
        bytes[0] = 20;
        let e = parse(&bytes, Dataset::Cifar100).unwrap_err().0;
        assert!(e.contains("coarse label 20"), "{e}");
    }

    #[test]
    fn short_input_is_an_error() {
        let bytes = records(Dataset::Cifar10, 2);
        let mut images = Images::with_capacity(2);
        let e = images.append(&bytes[..5000], 2, Dataset::Cifar10, Path::new("x.bin")).unwrap_err();
        assert!(e.0.starts_with("x.bin: record 1:"), "{e}");
    }

    #[test]
    fn dataset_names() {
        assert_eq!("cifar10".parse::<Dataset>().unwrap(), Dataset::Cifar10);
        assert_eq!("CIFAR-100".parse::<Dataset>().unwrap(), Dataset::Cifar100);
        assert!("mnist".parse::<Dataset>().unwrap_err().0.contains("cifar10, cifar100"));
        assert_eq!(Dataset::Cifar100.to_string(), "cifar100");
        assert_eq!(Dataset::Cifar100.record_bytes(), 3074);
    }
}
