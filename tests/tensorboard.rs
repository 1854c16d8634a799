//! TensorBoard event files: the per-epoch scalars `densenet train --tensorboard` writes, read back
//! by TensorBoard's own reader (`EventAccumulator`, from the `tensorboard` Python package run with
//! `$DENSENET_TB_PYTHON`, default `python3`) and by an independent Rust parser of the TFRecord
//! framing and the Event protobuf.
//!
//! Without the `tensorboard` package the read-back test says loudly that it was skipped and how
//! to install it, and fails instead under `DENSENET_REQUIRE_TENSORBOARD=1` (as in CI).

mod common;

use common::cifar;

use densenet::train::tensorboard::EventWriter;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};
use tempfile::TempDir;

/// The reference scalars, logged once per epoch.
const TAGS: [&str; 5] = ["train_loss", "train_acc", "val_loss", "val_acc", "learning_rate"];
const EPOCHS: i64 = 3;

/// One logged value.
#[derive(Clone, Debug, PartialEq)]
struct Scalar {
    tag: String,
    step: i64,
    value: f32,
}

/// Values like a short run's, with decimals that f32 cannot hold exactly.
fn value(tag: &str, epoch: i64) -> f32 {
    let e = epoch as f32;
    match tag {
        "train_loss" => 2.318_27 / (1.0 + e) + 1e-3,
        "train_acc" => 10.123_457 + 31.7 * e,
        "val_loss" => 2.4 - 0.333_333 * e,
        "val_acc" => 9.87 + 29.9 * e,
        "learning_rate" => [0.1, 0.01, 0.001][epoch as usize],
        _ => unreachable!(),
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Writes `EPOCHS` epochs of the reference scalars into `dir`, flushing after each epoch, and
/// checks after every flush that the file holds exactly what was written so far. Returns the
/// file and the scalars in writing order.
fn write_run(dir: &Path) -> (PathBuf, Vec<Scalar>) {
    let mut writer = EventWriter::create(dir).expect("create the event writer");
    let path = writer.path().to_path_buf();
    let mut written = Vec::new();
    for epoch in 0..EPOCHS {
        for tag in TAGS {
            let value = value(tag, epoch);
            writer.scalar(tag, value, epoch).expect("write a scalar");
            written.push(Scalar { tag: tag.to_string(), step: epoch, value });
        }
        writer.flush().expect("flush");
        // Flushed: visible to a reader while the writer is still open.
        let events = read_events(&path);
        assert_eq!(scalars(&events), written, "after flushing epoch {epoch}");
    }
    drop(writer);
    (path, written)
}

// ---- An independent reader: TFRecord framing and the Event protobuf ----

/// CRC-32C bit by bit (no table, unlike the writer).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The records of a TFRecord file, after checking each length, both CRCs and that nothing
/// trails the last record.
fn read_records(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).expect("read the event file");
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let n = records.len();
        assert!(at + 12 <= bytes.len(), "record {n}: truncated header");
        assert_eq!(u32_at(at + 8), masked(crc32c(&bytes[at..at + 8])), "record {n}: length CRC");
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let data = at + 12;
        assert!(data + len + 4 <= bytes.len(), "record {n}: length {len} runs past the end of the file");
        assert_eq!(u32_at(data + len), masked(crc32c(&bytes[data..data + len])), "record {n}: data CRC");
        records.push(bytes[data..data + len].to_vec());
        at = data + len + 4;
    }
    records
}

/// A protobuf field value.
#[derive(Debug)]
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn varint(buf: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = buf[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return v;
        }
    }
    panic!("varint longer than 10 bytes");
}

/// The (field number, value) pairs of a message.
fn fields(buf: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let key = varint(buf, &mut at);
        let field = match key & 7 {
            0 => Field::Varint(varint(buf, &mut at)),
            1 => {
                at += 8;
                Field::Fixed64(buf[at - 8..at].try_into().unwrap())
            }
            2 => {
                let len = varint(buf, &mut at) as usize;
                at += len;
                Field::Bytes(&buf[at - len..at])
            }
            5 => {
                at += 4;
                Field::Fixed32(buf[at - 4..at].try_into().unwrap())
            }
            t => panic!("unexpected wire type {t}"),
        };
        out.push((key >> 3, field));
    }
    assert_eq!(at, buf.len(), "message overruns its length");
    out
}

/// An `Event` as far as the writer uses it.
#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    /// (tag, simple_value) of each summary value.
    values: Vec<(String, f32)>,
}

fn parse_event(buf: &[u8]) -> Event {
    let mut event = Event::default();
    for (number, field) in fields(buf) {
        match (number, field) {
            (1, Field::Fixed64(b)) => event.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => event.step = v as i64,
            (3, Field::Bytes(b)) => event.file_version = Some(String::from_utf8(b.to_vec()).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (number, value) in fields(summary) {
                    let Field::Bytes(value) = value else { panic!("Summary.value is not a message") };
                    assert_eq!(number, 1, "unexpected Summary field");
                    let (mut tag, mut simple) = (None, None);
                    for field in fields(value) {
                        match field {
                            (1, Field::Bytes(b)) => tag = Some(String::from_utf8(b.to_vec()).unwrap()),
                            (2, Field::Fixed32(b)) => simple = Some(f32::from_le_bytes(b)),
                            other => panic!("unexpected Summary.Value field {other:?}"),
                        }
                    }
                    event.values.push((tag.expect("tag"), simple.expect("simple_value")));
                }
            }
            other => panic!("unexpected Event field {other:?}"),
        }
    }
    event
}

fn read_events(path: &Path) -> Vec<Event> {
    read_records(path).iter().map(|r| parse_event(r)).collect()
}

/// The scalars of all events but the first (the file-version event), in file order.
fn scalars(events: &[Event]) -> Vec<Scalar> {
    events[1..]
        .iter()
        .flat_map(|e| e.values.iter().map(|(tag, value)| Scalar { tag: tag.clone(), step: e.step, value: *value }))
        .collect()
}

#[test]
fn event_file_framing_and_events_read_back_in_rust() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("runs").join("DenseNet_BC_100_12");
    let start = unix_now();
    let (path, written) = write_run(&dir);
    let end = unix_now();

    assert_eq!(path.parent().unwrap(), dir);
    let name = path.file_name().unwrap().to_str().unwrap();
    let secs: u64 = name
        .strip_prefix("events.out.tfevents.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("file name {name} is not events.out.tfevents.<secs>.<host>"));
    assert!((start as u64..=end as u64).contains(&secs), "{secs} not in {start}..{end}");

    let events = read_events(&path);
    assert_eq!(events.len(), 1 + written.len(), "one file-version event, then one event per scalar");
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].values.is_empty());
    assert!(events[1..].iter().all(|e| e.file_version.is_none() && e.values.len() == 1));
    let mut last = start.floor();
    for e in &events {
        assert!(e.wall_time >= last && e.wall_time <= end, "wall time {} out of order or range", e.wall_time);
        last = e.wall_time;
    }
    assert_eq!(scalars(&events), written);
    // Bit-exact, including the learning rates 0.1 and 0.01 that have no exact binary form.
    for (read, wrote) in scalars(&events).iter().zip(&written) {
        assert_eq!(read.value.to_bits(), wrote.value.to_bits(), "{read:?}");
    }
}

/// Prints past cargo's output capture, so that a skip is seen even when the test passes.
fn shout(message: &str) {
    let _ = writeln!(std::io::stderr(), "\n{}\n{message}\n{}\n", "!".repeat(78), "!".repeat(78));
}

/// Reads every scalar of the event files in `dir` with TensorBoard's `EventAccumulator` and
/// prints one JSON object: file version and, per tag, `[step, wall_time, f32 bits]` triples.
const READER: &str = r#"
import json, struct, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
scalars = {
    tag: [[e.step, e.wall_time, struct.unpack("<I", struct.pack("<f", e.value))[0]] for e in acc.Scalars(tag)]
    for tag in acc.Tags()["scalars"]
}
print(json.dumps({"file_version": acc.file_version, "scalars": scalars}))
"#;

#[test]
fn tensorboard_reads_every_scalar_back() {
    let python = std::env::var("DENSENET_TB_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let required = std::env::var("DENSENET_REQUIRE_TENSORBOARD").is_ok_and(|v| v == "1");
    let probe = Command::new(&python).args(["-c", "import tensorboard"]).output();
    let problem = match &probe {
        Err(e) => Some(format!("cannot run the Python interpreter `{python}`: {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "`{python}` cannot import tensorboard: {}",
            String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("")
        )),
        Ok(_) => None,
    };
    if let Some(problem) = problem {
        let why = format!(
            "{problem}: TensorBoard's own reader is needed to read the event file back (python3 -m venv VENV && \
             VENV/bin/pip install tensorboard, then DENSENET_TB_PYTHON=VENV/bin/python)"
        );
        assert!(!required, "{why}, and DENSENET_REQUIRE_TENSORBOARD=1");
        shout(&format!("SKIPPED: TensorBoard read-back NOT run: {why}"));
        return;
    }

    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("runs").join("DenseNet_BC_100_12");
    let start = unix_now();
    let (_, written) = write_run(&dir);
    let end = unix_now();

    let out = Command::new(&python).args(["-c", READER]).arg(&dir).output().expect("run the TensorBoard reader");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "TensorBoard's reader failed:\n{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("reader output is not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));

    assert_eq!(json["file_version"].as_f64(), Some(2.0), "file version as TensorBoard parsed it");
    let tags = json["scalars"].as_object().expect("scalars object");
    let mut read_tags: Vec<&str> = tags.keys().map(String::as_str).collect();
    let mut want_tags = TAGS.to_vec();
    read_tags.sort_unstable();
    want_tags.sort_unstable();
    assert_eq!(read_tags, want_tags, "scalar tags TensorBoard found");

    for tag in TAGS {
        let want: Vec<(i64, u32)> =
            written.iter().filter(|s| s.tag == tag).map(|s| (s.step, s.value.to_bits())).collect();
        let got: Vec<(i64, u32)> = tags[tag]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let wall_time = t[1].as_f64().unwrap();
                assert!(wall_time >= start.floor() && wall_time <= end, "{tag}: wall time {wall_time}");
                (t[0].as_i64().unwrap(), t[2].as_u64().unwrap() as u32)
            })
            .collect();
        assert_eq!(
            got,
            want,
            "{tag}: (step, f32 bits) read by TensorBoard, values {:?}",
            got.iter().map(|&(_, b)| f32::from_bits(b)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn train_with_tensorboard_logs_the_reference_scalars_every_epoch() {
    let data = TempDir::new().unwrap();
    cifar::write(data.path(), cifar::Format::Cifar10, true, 24, 8);
    let runs = TempDir::new().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_densenet"))
        .args(["train", "--tensorboard", "--epochs", "2", "--layers", "10", "--growth", "4", "-b", "8"])
        .args(["--name", "tb", "--data-dir"])
        .arg(data.path())
        .arg("--runs-dir")
        .arg(runs.path())
        .current_dir(runs.path())
        .output()
        .expect("run the densenet binary");
    assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
    let dir = runs.path().join("tb");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(files.len(), 1, "one event file in {dir:?}");
    let got = scalars(&read_events(&files[0]));
    for tag in ["train_loss", "train_acc", "val_loss", "val_acc", "learning_rate"] {
        let steps: Vec<i64> = got.iter().filter(|s| s.tag == tag).map(|s| s.step).collect();
        assert_eq!(steps, [0, 1], "{tag}");
    }
    let lr: Vec<f32> = got.iter().filter(|s| s.tag == "learning_rate").map(|s| s.value).collect();
    assert_eq!(lr, [0.1, 0.01], "the schedule's rates");
    let acc = got.iter().filter(|s| s.tag.ends_with("_acc")).map(|s| s.value);
    assert!(acc.clone().all(|a| (0.0..=100.0).contains(&a)), "accuracies in percent");
}

/// Without TensorBoard's reader the read-back test skips, saying why, unless
/// `DENSENET_REQUIRE_TENSORBOARD=1` makes that a failure (this binary runs that test again with
/// an interpreter that does not exist).
#[test]
fn a_missing_tensorboard_skips_unless_required() {
    let run = |require: &str| {
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tensorboard_reads_every_scalar_back", "--nocapture", "--test-threads=1"])
            .env("DENSENET_TB_PYTHON", "/nonexistent/python-without-tensorboard")
            .env("DENSENET_REQUIRE_TENSORBOARD", require)
            .output()
            .unwrap()
    };
    let (optional, required) = (run("0"), run("1"));
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(optional.status.success(), "{}", text(&optional));
    assert!(text(&optional).contains("SKIPPED: TensorBoard read-back NOT run"), "{}", text(&optional));
    assert!(!required.status.success(), "passed without TensorBoard under DENSENET_REQUIRE_TENSORBOARD=1");
    assert!(text(&required).contains("DENSENET_REQUIRE_TENSORBOARD=1"), "{}", text(&required));
}
