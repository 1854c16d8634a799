//! What the library's unit tests share (the integration tests share `tests/common/`): CIFAR
//! records; for the parsers' fuzz tests, where a JSON text's values are, for mutations that
//! replace them (structure-aware, unlike flipping random bytes), and the README's table of
//! their counts, which each test checks its row of.

use crate::data::cifar::{Dataset, Images, IMAGE_BYTES};
use std::path::Path;

/// `n` records of `dataset` whose image `i` has every byte equal to `i` and label `i %
/// classes` (CIFAR-100: coarse label `i % 20`).
pub(crate) fn records(dataset: Dataset, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        if dataset == Dataset::Cifar100 {
            out.push((i % 20) as u8);
        }
        out.push((i % dataset.classes()) as u8);
        out.extend(std::iter::repeat_n(i as u8, IMAGE_BYTES));
    }
    out
}

/// The images of [`records`].
pub(crate) fn images(dataset: Dataset, n: usize) -> Images {
    let mut images = Images::with_capacity(n);
    images.append(&records(dataset, n)[..], n, dataset, Path::new("mem")).unwrap();
    images
}

/// Byte ranges of every number and every string's contents in the JSON text `text`.
pub(crate) fn json_spans(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        if bytes[i].is_ascii_digit() {
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            spans.push((start, i));
        } else if bytes[i] == b'"' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            spans.push((start + 1, i.min(bytes.len()) - 1));
        } else {
            i += 1;
        }
    }
    spans
}

/// Values that replace a JSON text's numbers and strings in the fuzz tests: numbers at and past
/// the limits of every integer type, non-finite and fractional ones, other types, control
/// characters, empty text; then `extra`, the parser's own words.
pub(crate) fn json_values<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let common = [
        "0",
        "1",
        "-1",
        "0.5",
        "4294967296",
        "18446744073709551615",
        "99999999999999999999",
        "1e308",
        "1e400",
        "nan",
        "true",
        "null",
        "[]",
        "[1,2]",
        "{}",
        "\\u0000",
        "\\n",
        "",
    ];
    common.into_iter().chain(extra.iter().copied()).collect()
}

/// What a fuzz test counted: its cases, and how many got past each of its checks.
pub(crate) struct Tally {
    /// The parser, as the README's fuzz table names it in its first column.
    pub parser: &'static str,
    /// Cases run.
    pub cases: u64,
    /// The counts the README's row gives after the cases, in its order.
    pub counts: Vec<u64>,
}

impl Tally {
    /// Checks the counts against the README's fuzz table (the tests are seeded, so the counts
    /// are exact): a parser that now accepts more or less than the README says fails here.
    pub fn check(&self) {
        let readme = include_str!("../README.md");
        let row = readme
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(&format!("| {} |", self.parser)))
            .unwrap_or_else(|| panic!("the README's fuzz table has no row '{}'", self.parser));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let numbers = |cell: &str| -> Vec<u64> {
            cell.split(|c: char| !c.is_ascii_digit() && c != ',')
                .filter_map(|w| w.replace(',', "").parse().ok())
                .collect()
        };
        let (cases, counts) = (numbers(cells[2]), numbers(cells[3]));
        assert_eq!(
            (cases.as_slice(), counts.as_slice()),
            (&[self.cases][..], self.counts.as_slice()),
            "the README's fuzz table says {row}; this build counts {} cases, {:?}: update the row",
            self.cases,
            self.counts
        );
    }
}

#[test]
fn spans_cover_numbers_and_string_contents() {
    let text = r#"{"a": 12, "b\"c": [3.5]}"#;
    let got: Vec<&str> = json_spans(text).into_iter().map(|(a, b)| &text[a..b]).collect();
    assert_eq!(got, ["a", "12", "b\\\"c", "3.5"]);
}
