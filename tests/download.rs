//! End-to-end runs of `densenet download` and `densenet train --download` on small CIFAR
//! archives the tests build, read from disk or served by a local HTTP server: extraction,
//! progress, an existing dataset left alone, and for every bad archive or failed download a
//! one-line error with the data directory left exactly as it was.

mod common;

use common::cifar;

use cifar::Format;
use flate2::write::GzEncoder;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;

/// A depth-10 bottleneck network at batch 8.
const TINY: [&str; 6] = ["--layers", "10", "--growth", "4", "-b", "8"];

fn densenet(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_densenet"));
    // The local server must be reached directly.
    for var in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(var);
    }
    // A fresh working directory, where the default `runs/` goes.
    let cwd = TempDir::new().unwrap();
    cmd.args(args).current_dir(cwd.path()).output().expect("run the densenet binary")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Runs `args`, asserts success, returns stdout and stderr.
fn succeeds(args: &[&str]) -> (String, String) {
    let out = densenet(args);
    assert!(out.status.success(), "{args:?} failed:\n{}{}", stdout(&out), stderr(&out));
    (stdout(&out), stderr(&out))
}

/// Runs `args`, asserts exit code 1, no panic, and one error line, the last on stderr, that
/// contains `needle`; returns that line.
fn fails(args: &[&str], needle: &str) -> String {
    let out = densenet(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: stdout {} stderr {err}", stdout(&out));
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    let last = err.lines().last().unwrap_or("");
    assert_eq!(errors, [last], "{args:?}: not one error line, the last: {err}");
    assert!(last.starts_with("error: ") && last.contains(needle), "{args:?}: '{needle}' not in {last}");
    assert!(stdout(&out).is_empty(), "{args:?}: {}", stdout(&out));
    last.to_string()
}

/// A CIFAR tar.gz as the official one is laid out: the dataset's folder with its record files
/// and a readme; `omit` leaves one file out, `folder` renames the folder.
fn archive(format: Format, train: usize, test: usize, omit: Option<&str>, folder: Option<&str>) -> Vec<u8> {
    let tmp = TempDir::new().unwrap();
    let root = cifar::write(tmp.path(), format, true, train, test);
    std::fs::write(root.join("readme.html"), "<html>test archive</html>").unwrap();
    if let Some(name) = omit {
        std::fs::remove_file(root.join(name)).unwrap();
    }
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::default()));
    tar.append_dir_all(folder.unwrap_or(format.folder()), &root).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

/// The CIFAR-10 test archive: 5 x 16 training and 20 test records.
fn cifar10_archive() -> Vec<u8> {
    archive(Format::Cifar10, 80, 20, None, None)
}

/// Every path under `dir` (hidden ones included) with its size and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path.clone());
            }
            out.insert(path.strip_prefix(dir).unwrap().to_path_buf(), (meta.len(), meta.modified().unwrap()));
        }
    }
    out
}

/// What the local server answers for a path.
#[derive(Clone)]
enum Reply {
    /// 200 with this body.
    Body(Vec<u8>),
    /// 200 announcing this many bytes, then the body and a closed connection.
    Truncated(Vec<u8>, usize),
}

/// An HTTP/1.1 server on 127.0.0.1 for one test: answers `routes` (others get 404) for at most
/// `max` requests, and stops after that or after two minutes. Joining gives the paths asked.
struct Server {
    base: String,
    handle: JoinHandle<Vec<String>>,
}

impl Server {
    fn start(routes: Vec<(&str, Reply)>, max: usize) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes: Vec<(String, Reply)> = routes.into_iter().map(|(p, r)| (p.to_string(), r)).collect();
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut asked = Vec::new();
            while asked.len() < max && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => asked.push(serve(stream, &routes)),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            asked
        });
        Server { base, handle }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The paths requested so far; waits for the server to finish its `max` requests.
    fn asked(self) -> Vec<String> {
        self.handle.join().unwrap()
    }
}

/// Answers one request; returns its path.
fn serve(mut stream: TcpStream, routes: &[(String, Reply)]) -> String {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
        request.push(byte[0]);
    }
    let request = String::from_utf8_lossy(&request).into_owned();
    let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
    let reply = routes.iter().find(|(p, _)| *p == path).map(|(_, r)| r.clone());
    let (status, body, length) = match reply {
        Some(Reply::Body(body)) => ("200 OK", body.clone(), body.len()),
        Some(Reply::Truncated(body, length)) => ("200 OK", body, length),
        None => ("404 Not Found", b"not found".to_vec(), 9),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {length}\r\nContent-Type: application/gzip\r\nConnection: close\r\n\r\n"
    );
    let _ = stream.write_all(head.as_bytes());
    // In pieces, so that the client sees the bytes arrive.
    for piece in body.chunks(16 << 10) {
        let _ = stream.write_all(piece).and_then(|()| stream.flush());
        std::thread::sleep(Duration::from_millis(2));
    }
    path
}

fn cifar10_files() -> Vec<&'static str> {
    let (train, test) = Format::Cifar10.files();
    train.iter().copied().chain([test, "readme.html"]).collect()
}

#[test]
fn archive_is_extracted_then_trained_on() {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&file, cifar10_archive()).unwrap();
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();

    let (out, err) = succeeds(&["download", "--data-dir", d, "--archive", file.to_str().unwrap()]);
    let folder = data.join("cifar-10-batches-bin");
    assert_eq!(out, format!("CIFAR-10 is ready in {}: 80 training and 20 test images\n", folder.display()));
    assert!(err.contains("is not the official CIFAR-10 archive (MD5 "), "{err}");
    assert!(err.contains("official c32a1d4ab5d03f1284b67883e8d87530"), "{err}");
    // The folder and nothing else; the readme comes along.
    let mut names: Vec<String> = snapshot(&data).keys().map(|p| p.display().to_string()).collect();
    names.sort();
    let mut expected: Vec<String> = cifar10_files().iter().map(|f| format!("cifar-10-batches-bin/{f}")).collect();
    expected.push("cifar-10-batches-bin".into());
    expected.sort();
    assert_eq!(names, expected);
    let (_, test_file) = Format::Cifar10.files();
    assert_eq!(std::fs::read(folder.join(test_file)).unwrap(), cifar::records(Format::Cifar10, 80, 20));

    let mut args = vec!["train", "--data-dir", d, "--epochs", "1"];
    args.extend(TINY);
    let (out, _) = succeeds(&args);
    assert!(out.contains("on CIFAR-10: 80 training and 20 test images"), "{out}");
    assert!(out.lines().last().unwrap().starts_with("Best accuracy: "), "{out}");
}

#[test]
fn leftovers_of_a_killed_download_are_removed() {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("c10.tgz");
    std::fs::write(&file, cifar10_archive()).unwrap();
    let data = tmp.path().join("data");
    let part = data.join(".cifar-10-binary.tar.gz.a1b2.part");
    let staging = data.join(".cifar-10-batches-bin.c3d4");
    let mine = data.join("notes.part");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("data_batch_1.bin"), b"half").unwrap();
    std::fs::write(&part, b"half an archive").unwrap();
    std::fs::write(&mine, b"not ours").unwrap();
    succeeds(&["download", "--data-dir", data.to_str().unwrap(), "--archive", file.to_str().unwrap()]);
    assert!(!part.exists() && !staging.exists(), "the killed run's files are gone");
    assert!(mine.exists(), "other files are left alone");
    assert!(data.join("cifar-10-batches-bin/test_batch.bin").is_file());
}

#[test]
fn cifar100_archive_is_extracted() {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("c100.tgz");
    std::fs::write(&file, archive(Format::Cifar100, 30, 9, None, None)).unwrap();
    let data = tmp.path().join("data");
    let args = ["download", "--dataset", "cifar100", "--data-dir", data.to_str().unwrap()];
    let (out, _) = succeeds(&[&args[..], &["--archive", file.to_str().unwrap()]].concat());
    assert!(out.ends_with("cifar-100-binary: 30 training and 9 test images\n"), "{out}");
    assert!(data.join("cifar-100-binary/train.bin").is_file());
}

#[test]
fn url_download_shows_progress_and_a_second_run_changes_nothing() {
    let bytes = cifar10_archive();
    let server = Server::start(vec![("/mirror/cifar-10-binary.tar.gz", Reply::Body(bytes.clone()))], 1);
    let url = server.url("/mirror/cifar-10-binary.tar.gz");
    let tmp = TempDir::new().unwrap();
    // A data directory that does not exist yet.
    let data = tmp.path().join("a/data");
    let d = data.to_str().unwrap();

    let (out, err) = succeeds(&["download", "--data-dir", d, "--url", &url]);
    assert!(out.starts_with("CIFAR-10 is ready in "), "{out}");
    assert!(err.starts_with(&format!("Downloading CIFAR-10 from {url}\n")), "{err}");
    let kib = format!("{:.1} KiB", bytes.len() as f64 / 1024.0);
    assert!(err.contains(&format!("  {kib} / {kib} (100%)")), "{err}");
    assert!(err.contains(&format!("Downloaded {kib} ({} bytes) in ", bytes.len())), "{err}");
    assert!(err.contains("is not the official CIFAR-10 archive"), "{err}");
    assert_eq!(server.asked(), ["/mirror/cifar-10-binary.tar.gz"]);

    // Already there: no request (the server is gone), nothing touched.
    let before = snapshot(&data);
    for args in [vec!["download", "--data-dir", d, "--url", &url], vec!["download", "--data-dir", d]] {
        let (out, err) = succeeds(&args);
        assert_eq!(
            out,
            format!(
                "CIFAR-10 is already in {} (80 training and 20 test images); nothing downloaded\n",
                data.join("cifar-10-batches-bin").display()
            )
        );
        assert!(err.is_empty(), "{err}");
        assert_eq!(snapshot(&data), before);
    }
}

#[test]
fn train_download_fetches_then_trains_and_later_uses_what_is_there() {
    let server = Server::start(vec![("/c10.tgz", Reply::Body(cifar10_archive()))], 1);
    let url = server.url("/c10.tgz");
    let tmp = TempDir::new().unwrap();
    let d = tmp.path().to_str().unwrap();
    let mut args = vec!["train", "--download", "--url", &url, "--data-dir", d, "--epochs", "1"];
    args.extend(TINY);
    let (out, err) = succeeds(&args);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("CIFAR-10 is ready in ") && lines[0].ends_with(": 80 training and 20 test images"));
    assert!(lines[1].contains("on CIFAR-10: 80 training and 20 test images"), "{out}");
    assert!(lines.last().unwrap().starts_with("Best accuracy: "), "{out}");
    assert!(err.contains("(100%)"), "{err}");
    assert_eq!(server.asked(), ["/c10.tgz"]);

    // Present: no download (nothing listens at that URL any more), no message.
    let (out, err) = succeeds(&args);
    assert!(out.lines().next().unwrap().starts_with("DenseNet-BC-10-4 "), "{out}");
    assert!(!err.contains("Downloading"), "{err}");
}

#[test]
fn source_flags_need_download_for_train() {
    let out = densenet(&["train", "--url", "http://127.0.0.1:9/x.tgz"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "error: --url and --archive say where --download fetches the dataset from: add --download\n"
    );
    let out = densenet(&["download", "--url", "http://127.0.0.1:9/x.tgz", "--archive", "x.tgz"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("error: the argument '--url <URL>' cannot be used with '--archive <PATH>'"));
}

#[test]
fn every_failure_is_one_line_and_leaves_the_data_dir_as_it_was() {
    let good = cifar10_archive();
    let truncated = good[..good.len() / 2].to_vec();
    let mut corrupt = good.clone();
    let middle = corrupt.len() / 2;
    for b in &mut corrupt[middle..middle + 64] {
        *b ^= 0x5a;
    }
    // A tar whose data_batch_3.bin lost its last 100 bytes, plain and gzipped.
    let plain_tar = {
        let tmp = TempDir::new().unwrap();
        let root = cifar::write(tmp.path(), Format::Cifar10, true, 80, 20);
        let bytes = std::fs::read(root.join("data_batch_3.bin")).unwrap();
        std::fs::write(root.join("data_batch_3.bin"), &bytes[..bytes.len() - 100]).unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        tar.append_dir_all("cifar-10-batches-bin", &root).unwrap();
        tar.into_inner().unwrap()
    };
    let short_file = {
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain_tar).unwrap();
        gz.finish().unwrap()
    };
    let archives: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", truncated.clone(), "is truncated"),
        ("corrupt", corrupt, "nothing was extracted"),
        ("not gzip", b"junk".to_vec(), "is not a gzip file"),
        ("plain tar", plain_tar, "is not a gzip file"),
        ("empty", Vec::new(), "is empty"),
        ("html", b"<html>a login page</html>".to_vec(), "is not a gzip file (an HTML page?)"),
        (
            "missing file",
            archive(Format::Cifar10, 80, 20, Some("data_batch_4.bin"), None),
            "has no cifar-10-batches-bin/data_batch_4.bin; nothing was extracted",
        ),
        (
            "python version",
            archive(Format::Cifar10, 80, 20, None, Some("cifar-10-batches-py")),
            "(it holds cifar-10-batches-py/ instead)",
        ),
        (
            "short record file",
            short_file,
            "is unusable: cifar-10-batches-bin/data_batch_3.bin: 49068 bytes is not a whole",
        ),
    ];
    let server = Server::start(
        vec![("/cut.tgz", Reply::Truncated(good.clone(), good.len() + 1000)), ("/half.tgz", Reply::Body(truncated))],
        3,
    );
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/x.tgz", l.local_addr().unwrap())
    };

    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("notes.txt"), "mine").unwrap();
    let d = data.to_str().unwrap();
    let before = snapshot(&data);
    let check = |args: &[&str], needle: &str| {
        let line = fails(args, needle);
        assert_eq!(snapshot(&data), before, "{args:?} ({line}) changed the data dir");
        line
    };

    for (what, bytes, needle) in &archives {
        let file = tmp.path().join(format!("{what}.tar.gz"));
        std::fs::write(&file, bytes).unwrap();
        let f = file.to_str().unwrap();
        let line = check(&["download", "--data-dir", d, "--archive", f], needle);
        assert!(line.starts_with(&format!("error: the archive {f} ")), "{what}: {line}");
    }
    let file = tmp.path().join("missing file.tar.gz");
    check(
        &["download", "--dataset", "cifar100", "--data-dir", d, "--archive", file.to_str().unwrap()],
        "has no cifar-100-binary/train.bin, test.bin (it holds cifar-10-batches-bin/ instead)",
    );
    check(&["download", "--data-dir", d, "--archive", "/no/such/archive.tgz"], "cannot read the archive");

    let url = server.url("/cut.tgz");
    check(&["download", "--data-dir", d, "--url", &url], &format!("cut off after {} of", good.len()));
    check(&["download", "--data-dir", d, "--url", &server.url("/half.tgz")], "is truncated");
    check(&["download", "--data-dir", d, "--url", &server.url("/nothing.tgz")], "failed: HTTP 404 Not Found");
    check(&["download", "--data-dir", d, "--url", &refused], "cannot download");
    check(&["download", "--data-dir", d, "--url", "ftp://example.org/x.tgz"], "bad URL");
    assert_eq!(server.asked(), ["/cut.tgz", "/half.tgz", "/nothing.tgz"]);

    // train --download fails the same way, before training.
    let mut args = vec!["train", "--download", "--data-dir", d, "--archive", "/no/such/archive.tgz"];
    args.extend(TINY);
    check(&args, "cannot read the archive");
}

#[test]
fn a_failure_removes_the_directories_it_created() {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("bad.tgz");
    std::fs::write(&file, b"junk").unwrap();
    let data = tmp.path().join("new/data");
    fails(&["download", "--data-dir", data.to_str().unwrap(), "--archive", file.to_str().unwrap()], "not a gzip");
    assert!(!tmp.path().join("new").exists());
}

#[test]
fn an_unusable_dataset_in_place_is_left_alone() {
    let tmp = TempDir::new().unwrap();
    let root = cifar::write(tmp.path(), Format::Cifar10, true, 80, 20);
    std::fs::remove_file(root.join("test_batch.bin")).unwrap();
    let file = tmp.path().join("good.tgz");
    std::fs::write(&file, cifar10_archive()).unwrap();
    let before = snapshot(tmp.path());
    let d = tmp.path().to_str().unwrap();
    fails(&["download", "--data-dir", d, "--archive", file.to_str().unwrap()], "CIFAR-10 is in ");
    fails(&["download", "--data-dir", d], "but unusable, so nothing was downloaded: missing CIFAR-10 file");
    assert_eq!(snapshot(tmp.path()), before);
}

/// `train --download` over unusable data says what `download` says; `download --force`
/// replaces the dataset's folder with a fresh copy, and keeps the old one when that fails.
#[test]
fn force_replaces_an_unusable_dataset_and_train_download_explains_it() {
    let tmp = TempDir::new().unwrap();
    let root = cifar::write(tmp.path(), Format::Cifar10, true, 80, 20);
    std::fs::remove_file(root.join("test_batch.bin")).unwrap();
    let d = tmp.path().to_str().unwrap();
    let unusable = "but unusable, so nothing was downloaded: missing CIFAR-10 file";
    let told = fails(&["download", "--data-dir", d], unusable);
    assert!(told.contains("densenet download --force"), "{told}");
    let mut train = vec!["train", "--download", "--data-dir", d, "--epochs", "1", "--device", "cpu"];
    train.extend(TINY);
    fails(&train, unusable);
    // A failing forced download leaves the old folder as it was.
    let junk = tmp.path().join("junk.tgz");
    std::fs::write(&junk, b"junk").unwrap();
    let before = snapshot(tmp.path());
    fails(&["download", "--force", "--data-dir", d, "--archive", junk.to_str().unwrap()], "not a gzip");
    assert_eq!(snapshot(tmp.path()), before);
    // A good one replaces it, and training then runs.
    let good = tmp.path().join("good.tgz");
    std::fs::write(&good, cifar10_archive()).unwrap();
    let (out, _) = succeeds(&["download", "--force", "--data-dir", d, "--archive", good.to_str().unwrap()]);
    assert!(out.contains("CIFAR-10 is ready in ") && out.contains("80 training and 20 test images"), "{out}");
    assert!(root.join("test_batch.bin").is_file());
    let names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains("-replaced-")), "the old copy was left: {names:?}");
    succeeds(&train);
}

/// The messages point to the way out: a missing dataset names --download and `densenet download
/// --archive`; a file:// URL names --archive.
#[test]
fn missing_data_and_file_urls_point_to_the_right_flags() {
    let tmp = TempDir::new().unwrap();
    let d = tmp.path().to_str().unwrap();
    let mut train = vec!["train", "--data-dir", d, "--epochs", "1", "--device", "cpu"];
    train.extend(TINY);
    let e = fails(&train, "CIFAR-10 not found in");
    assert!(e.contains("add --download") && e.contains("densenet download --archive PATH"), "{e}");
    fails(
        &["download", "--data-dir", d, "--url", "file:///tmp/cifar-10-binary.tar.gz"],
        "a local archive is given with --archive /tmp/cifar-10-binary.tar.gz, not as a URL",
    );
}
