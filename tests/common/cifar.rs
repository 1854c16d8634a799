//! Tiny data sets in the official CIFAR binary formats, written to a directory.

use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// Which format to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `cifar-10-batches-bin/`: five training files and `test_batch.bin`; label, pixels.
    Cifar10,
    /// `cifar-100-binary/`: `train.bin`, `test.bin`; coarse label, fine label, pixels.
    Cifar100,
}

impl Format {
    fn classes(self) -> usize {
        match self {
            Format::Cifar10 => 10,
            Format::Cifar100 => 100,
        }
    }

    /// The archive's folder name.
    pub fn folder(self) -> &'static str {
        match self {
            Format::Cifar10 => "cifar-10-batches-bin",
            Format::Cifar100 => "cifar-100-binary",
        }
    }

    /// The training files, then the test file.
    pub fn files(self) -> (&'static [&'static str], &'static str) {
        match self {
            Format::Cifar10 => (
                &["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"],
                "test_batch.bin",
            ),
            Format::Cifar100 => (&["train.bin"], "test.bin"),
        }
    }
}

/// `n` records starting at record `first`: record i has label `i % classes` (CIFAR-100:
/// coarse label `i % 20`) and an image whose brightness in channel `label % 3` tells its class,
/// over a pseudo-random texture.
pub fn records(format: Format, first: usize, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in first..first + n {
        let label = i % format.classes();
        if format == Format::Cifar100 {
            out.push((i % 20) as u8);
        }
        out.push(label as u8);
        for p in 0..3 * 1024 {
            let noise = ((i * 7919 + p * 104_729) % 97) as u8;
            out.push(if p / 1024 == label % 3 { 150 + noise } else { noise });
        }
    }
    out
}

/// Writes `train` training records (split evenly over the training files) and `test` test
/// records under `dir`: in the archive's folder when `nested`, else directly. Returns the folder
/// holding the files.
pub fn write(dir: &Path, format: Format, nested: bool, train: usize, test: usize) -> PathBuf {
    let root = if nested { dir.join(format.folder()) } else { dir.to_path_buf() };
    std::fs::create_dir_all(&root).unwrap();
    let (train_files, test_file) = format.files();
    let per_file = train / train_files.len();
    for (f, name) in train_files.iter().enumerate() {
        std::fs::write(root.join(name), records(format, f * per_file, per_file)).unwrap();
    }
    std::fs::write(root.join(test_file), records(format, train, test)).unwrap();
    root
}

/// Tiny data sets and a runs directory, both temporary.
pub struct Dirs {
    /// The data directory.
    pub data: TempDir,
    /// The runs directory.
    pub runs: TempDir,
}

impl Dirs {
    /// Writes each of `sets`, (format, training records, test records), in its archive's
    /// folder of a new data directory.
    pub fn new(sets: &[(Format, usize, usize)]) -> Dirs {
        let data = TempDir::new().unwrap();
        for &(format, train, test) in sets {
            write(data.path(), format, true, train, test);
        }
        Dirs { data, runs: TempDir::new().unwrap() }
    }
}
