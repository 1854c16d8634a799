//! TensorBoard event files, written directly: TFRecord framing with masked CRC-32C around
//! hand-encoded `Event` protobufs that carry scalar summaries.
//!
//! A file is a sequence of records, each
//! `u64 length (LE) | masked CRC-32C of the length bytes | data | masked CRC-32C of the data`,
//! where the mask is `((crc >> 15) | (crc << 17)) + 0xa282ead8`. The first record's data is an
//! `Event { wall_time = 1; file_version = 3: "brain.Event:2" }`; every scalar is an
//! `Event { wall_time = 1; step = 2; summary = 5 }` whose `Summary { repeated Value value = 1 }`
//! holds one `Value { string tag = 1; float simple_value = 2 }`. The bytes are those TensorBoard's
//! own Python writer produces for the same event (proto3: a zero step is left out).

use crate::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The event-file format version TensorBoard expects in the first event.
const FILE_VERSION: &str = "brain.Event:2";

/// Appends scalar summaries to one TensorBoard event file
/// (`events.out.tfevents.<unix secs>.<hostname>`).
///
/// Writes are buffered: call [`EventWriter::flush`] after each epoch's scalars so that
/// TensorBoard sees them while training runs. Dropping the writer flushes what is left,
/// ignoring errors.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if missing and a new event file in it, and writes the file-version event.
    ///
    /// An existing file is never overwritten: if the name is taken (two writers started in the
    /// same second), `.1`, `.2`, ... is appended; TensorBoard reads every `*tfevents*` file of
    /// the directory.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        fs::create_dir_all(dir)
            .map_err(|e| Error(format!("cannot create TensorBoard directory {}: {e}", dir.display())))?;
        let wall_time = now();
        let base = format!("events.out.tfevents.{}.{}", wall_time as u64, hostname());
        let mut suffix = 0u32;
        let (path, file) = loop {
            let name = if suffix == 0 { base.clone() } else { format!("{base}.{suffix}") };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && suffix < 1000 => suffix += 1,
                Err(e) => return Err(Error(format!("cannot create TensorBoard event file {}: {e}", path.display()))),
            }
        };
        let mut writer = EventWriter { path, file: BufWriter::new(file) };
        writer.write_event(&encode_event(wall_time, 0, &EventBody::FileVersion(FILE_VERSION)))?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one scalar `value` for `tag` at `step` (the epoch), stamped with the current time.
    pub fn scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        self.write_event(&encode_event(now(), step, &EventBody::Scalar { tag, value }))
    }

    /// Writes buffered events to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| self.error(e))
    }

    fn write_event(&mut self, event: &[u8]) -> Result<()> {
        let record = encode_record(event);
        self.file.write_all(&record).map_err(|e| self.error(e))
    }

    fn error(&self, e: io::Error) -> Error {
        Error(format!("cannot write TensorBoard event file {}: {e}", self.path.display()))
    }
}

/// Seconds since the Unix epoch, with sub-second precision.
fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The machine's name for the file name (as TensorBoard's writer uses), reduced to characters
/// safe in a file name; `localhost` if it cannot be found.
fn hostname() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let name: String =
        raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

/// What an event carries besides its time and step.
enum EventBody<'a> {
    /// The first event of a file: the format version.
    FileVersion(&'a str),
    /// One scalar summary value.
    Scalar { tag: &'a str, value: f32 },
}

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// Appends a base-128 varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a field key (field number and wire type).
fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u32) {
    put_varint(out, u64::from(field << 3 | wire_type));
}

/// Appends a length-delimited field (string, bytes or embedded message).
fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The serialized `Event` message.
fn encode_event(wall_time: f64, step: i64, body: &EventBody) -> Vec<u8> {
    let mut event = Vec::with_capacity(64);
    put_key(&mut event, 1, FIXED64);
    event.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        put_key(&mut event, 2, VARINT);
        // int64: two's complement, so a negative step takes ten bytes.
        put_varint(&mut event, step as u64);
    }
    match *body {
        EventBody::FileVersion(version) => put_bytes(&mut event, 3, version.as_bytes()),
        EventBody::Scalar { tag, value } => {
            let mut summary_value = Vec::with_capacity(tag.len() + 8);
            put_bytes(&mut summary_value, 1, tag.as_bytes());
            put_key(&mut summary_value, 2, FIXED32);
            summary_value.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::with_capacity(summary_value.len() + 4);
            put_bytes(&mut summary, 1, &summary_value);
            put_bytes(&mut event, 5, &summary);
        }
    }
    event
}

/// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
fn encode_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// The CRC-32C (Castagnoli) lookup table, built at compile time from the reflected polynomial.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-32C (Castagnoli) of `data`.
fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| (crc >> 8) ^ CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize])
}

/// The CRC as TFRecord stores it: `((crc >> 15) | (crc << 17)) + 0xa282ead8`, wrapping.
fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 (iSCSI), appendix B.4.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        let descending: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&descending), 0x113F_DB5C);
    }

    #[test]
    fn masked_crc_matches_tensorboard() {
        // Values from tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c.
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
        assert_eq!(masked_crc32c(b"hello"), 0x191c_1fbb);
        assert_eq!(masked_crc32c(&[0u8; 8]), 0x0798_0329);
    }

    #[test]
    fn varints() {
        let enc = |v: u64| {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            out
        };
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(1), [0x01]);
        assert_eq!(enc(127), [0x7f]);
        assert_eq!(enc(128), [0x80, 0x01]);
        assert_eq!(enc(150), [0x96, 0x01]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(enc(u64::MAX), [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(enc(-1i64 as u64), enc(u64::MAX));
    }

    #[test]
    fn record_framing_matches_tensorboard() {
        // tensorboard.summary.writer.record_writer.RecordWriter writing b"hello".
        assert_eq!(encode_record(b"hello"), hex("0500000000000000eab2043e68656c6c6fbb1f1c19"));
        let empty = encode_record(b"");
        assert_eq!(empty.len(), 16);
        assert_eq!(empty[12..], 0xa282_ead8u32.to_le_bytes());
    }

    #[test]
    fn events_match_tensorboard_protobuf() {
        // event_pb2.Event(...).SerializeToString() from the tensorboard package.
        let scalar = encode_event(1_700_000_000.5, 3, &EventBody::Scalar { tag: "val_acc", value: 0.25 });
        assert_eq!(scalar, hex("0900002040fc54d94110032a100a0e0a0776616c5f616363150000803e"));
        let version = encode_event(1_700_000_000.5, 0, &EventBody::FileVersion(FILE_VERSION));
        assert_eq!(version, hex("0900002040fc54d9411a0d627261696e2e4576656e743a32"));
        let negative = encode_event(1.0, -1, &EventBody::FileVersion(""));
        assert_eq!(negative[..20], hex("09000000000000f03f10ffffffffffffffffff01"));
    }

    #[test]
    fn create_names_the_file_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("runs").join("x");
        let a = EventWriter::create(&sub).unwrap();
        let b = EventWriter::create(&sub).unwrap();
        assert_ne!(a.path(), b.path());
        for w in [&a, &b] {
            let name = w.path().file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with("events.out.tfevents."), "{name}");
            assert_eq!(w.path().parent().unwrap(), sub);
        }
        let bytes = fs::read(a.path()).unwrap();
        assert_eq!(bytes.len(), 16 + 9 + 2 + FILE_VERSION.len());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        fs::write(&blocker, b"").unwrap();
        let err = EventWriter::create(&blocker.join("run")).unwrap_err();
        assert!(err.0.contains("not-a-dir"), "{err}");
        assert!(!err.0.contains('\n'), "{err}");
    }
}
