//! Fetching the official CIFAR binary archives into a data directory.
//!
//! [`fetch`] downloads the archive (from the official site or a mirror) or reads a local copy,
//! checks its MD5 against the official one, and extracts it atomically: the dataset's folder is
//! written inside a temporary directory in the data directory, its files are read back with the
//! [`cifar`](super::cifar) readers, and only then is it renamed into place. A failure leaves the
//! data directory as it was: the temporary download and folder are removed, and so are the
//! directories created for it. A dataset already in place is never touched.
//!
//! The official archive must match its published MD5. An archive from `--url` or `--archive`
//! that does not (a rebuilt or trimmed copy) is used with a note, once its files check out.

use super::cifar::{Dataset, Images, Split};
use crate::error::one_line;
use crate::{bail, Error, Result};
use flate2::read::GzDecoder;
use md5::{Digest, Md5};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// Where the archive comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The official URL ([`official_url`]).
    Official,
    /// Another URL serving the archive (a mirror); the official URL itself counts as official.
    Url(String),
    /// A local copy of the archive.
    Archive(PathBuf),
}

/// The dataset [`fetch`] left in the data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The folder holding the dataset's files.
    pub folder: PathBuf,
    /// Training images.
    pub train: usize,
    /// Test images.
    pub test: usize,
    /// True when the dataset was already there and nothing was fetched.
    pub already_there: bool,
}

/// The official archive's URL.
pub fn official_url(dataset: Dataset) -> &'static str {
    match dataset {
        Dataset::Cifar10 => "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        Dataset::Cifar100 => "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    }
}

/// The official archive's MD5, as published on the CIFAR page (lowercase hex).
pub fn official_md5(dataset: Dataset) -> &'static str {
    match dataset {
        Dataset::Cifar10 => "c32a1d4ab5d03f1284b67883e8d87530",
        Dataset::Cifar100 => "03b5dce01913d631647c71ecec9e9cb8",
    }
}

/// True when `dir` holds neither the dataset's folder nor any of its files (the places the
/// readers look).
pub fn is_missing(dir: &Path, dataset: Dataset) -> bool {
    let files = [Split::Train, Split::Test].into_iter().flat_map(|s| dataset.files(s));
    !dir.join(dataset.folder()).exists() && !files.into_iter().any(|f| dir.join(f).exists())
}

/// Receives a download's progress (the command line draws it).
pub trait Progress {
    /// `done` bytes have arrived, of `total` when the server announced it.
    fn update(&mut self, done: u64, total: Option<u64>);
    /// The stream ended after `done` bytes (fewer than announced: an error follows). Not
    /// called when reading fails.
    fn finish(&mut self, done: u64);
}

/// Puts `dataset` into `dir` from `source` unless it is already there (then checks it and
/// changes nothing). A download reports to `progress`; notes go to the log.
pub fn fetch(dir: &Path, dataset: Dataset, source: &Source, progress: &mut dyn Progress) -> Result<Fetched> {
    if let Source::Url(url) = source {
        check_url(url)?;
    }
    if !is_missing(dir, dataset) {
        return present(dir, dataset);
    }
    let created = create_dirs(dir)?;
    let fetched = fetch_missing(dir, dataset, source, progress);
    if fetched.is_err() {
        // Deepest first; only empty directories go, so nothing of anyone else's is removed.
        for d in &created {
            let _ = fs::remove_dir(d);
        }
    }
    fetched
}

/// An `http://` or `https://` URL with a host.
fn check_url(url: &str) -> Result<()> {
    if let Some(path) = url.strip_prefix("file://") {
        bail!("--url {url}: a local archive is given with --archive {path}, not as a URL");
    }
    let uri: ureq::http::Uri = url.parse().map_err(|e| Error(format!("bad URL '{url}': {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
        bail!("bad URL '{url}': expected http://HOST/... or https://HOST/...");
    }
    Ok(())
}

/// As [`fetch`], but replacing the dataset's folder in `dir` when it is there: the new copy is
/// fetched and extracted first, and the old one is removed only once the new one is in place
/// (restored if the fetch fails). Data directly in `dir`, outside the folder, is refused.
pub fn refetch(dir: &Path, dataset: Dataset, source: &Source, progress: &mut dyn Progress) -> Result<Fetched> {
    if let Source::Url(url) = source {
        check_url(url)?;
    }
    let folder = dir.join(dataset.folder());
    if !folder.exists() {
        if !is_missing(dir, dataset) {
            bail!(
                "{}'s files lie directly in {}, outside {}/: --force replaces only that folder; move them away",
                dataset.title(),
                dir.display(),
                dataset.folder()
            );
        }
        return fetch(dir, dataset, source, progress);
    }
    // Not named like a staging folder (`.<folder>.*`), which a fetch removes as a leftover.
    let aside = dir.join(format!(".{}-replaced-{}", dataset.folder(), std::process::id()));
    fs::rename(&folder, &aside).map_err(|e| Error(format!("cannot move {} aside: {e}", folder.display())))?;
    match fetch(dir, dataset, source, progress) {
        Ok(fetched) => {
            // Best effort: a copy that cannot be removed is only clutter.
            let _ = fs::remove_dir_all(&aside);
            Ok(fetched)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&folder);
            fs::rename(&aside, &folder).map_err(|r| {
                Error(format!(
                    "{e}; and the old {} could not be put back from {} ({r})",
                    folder.display(),
                    aside.display()
                ))
            })?;
            Err(e)
        }
    }
}

/// The dataset already in `dir`, read back; an error when it is incomplete or damaged.
fn present(dir: &Path, dataset: Dataset) -> Result<Fetched> {
    let loaded = Images::load(dir, dataset, Split::Train).and_then(|train| {
        let test = Images::load(dir, dataset, Split::Test)?;
        Ok((train.len(), test.len()))
    });
    match loaded {
        Ok((train, test)) => {
            let nested = dir.join(dataset.folder());
            let folder = if nested.is_dir() { nested } else { dir.to_path_buf() };
            Ok(Fetched { folder, train, test, already_there: true })
        }
        Err(e) => bail!(
            "{} is in {} but unusable, so nothing was downloaded: {e}; download it again with densenet download \
             --force (which replaces {}/), or move it away",
            dataset.title(),
            dir.display(),
            dataset.folder()
        ),
    }
}

/// Creates `dir` and its missing parents; returns the ones it created, deepest first.
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let created: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && fs::symlink_metadata(d).is_err())
        .map(Path::to_path_buf)
        .collect();
    fs::create_dir_all(dir).map_err(|e| Error(format!("cannot create the data directory {}: {e}", dir.display())))?;
    Ok(created)
}

fn fetch_missing(dir: &Path, dataset: Dataset, source: &Source, progress: &mut dyn Progress) -> Result<Fetched> {
    remove_leftovers(dir, dataset);
    let url = match source {
        Source::Archive(path) => {
            let md5 = md5_file(path)?;
            return install(dir, dataset, path, &md5, &path.display().to_string(), false);
        }
        Source::Url(url) => url.as_str(),
        Source::Official => official_url(dataset),
    };
    let (file, md5) = download(url, dir, dataset, progress)?;
    install(dir, dataset, file.path(), &md5, url, url == official_url(dataset))
}

/// Removes what an earlier fetch of `dataset` that was killed left in `dir`: its hidden
/// partial download and its hidden staging folder (best effort; they are only clutter).
fn remove_leftovers(dir: &Path, dataset: Dataset) {
    let (part, staging) = (format!(".{}.", dataset.archive()), format!(".{}.", dataset.folder()));
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&part) && name.ends_with(".part") {
            let _ = fs::remove_file(entry.path());
        } else if name.starts_with(&staging) && entry.path().is_dir() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Checks the archive's MD5 (which must be the official one when `official`), then extracts it
/// into `dir`. `origin` names the archive in messages.
fn install(dir: &Path, dataset: Dataset, archive: &Path, md5: &str, origin: &str, official: bool) -> Result<Fetched> {
    let expected = official_md5(dataset);
    if md5 == expected {
        log::info!("MD5 {md5} matches the official {} archive", dataset.title());
    } else if official {
        bail!(
            "{origin}: MD5 {md5} does not match the official {} archive's {expected} (a damaged or \
             changed download); nothing was extracted",
            dataset.title()
        );
    } else {
        log::info!(
            "note: {origin} is not the official {} archive (MD5 {md5}, official {expected}); using it if it \
             holds the expected files",
            dataset.title()
        );
    }
    extract(archive, dir, dataset, origin)
}

/// The lowercase hex MD5 of a file.
fn md5_file(path: &Path) -> Result<String> {
    let cannot = |e: io::Error| Error(format!("cannot read the archive {}: {e}", path.display()));
    let file = File::open(path).map_err(cannot)?;
    if !file.metadata().map_err(cannot)?.is_file() {
        bail!("cannot read the archive {}: not a file", path.display());
    }
    let mut hasher = Md5::new();
    let hash = |chunk: &[u8], _| {
        hasher.update(chunk);
        Ok(())
    };
    each_chunk(file, hash, |e, _| cannot(e))?;
    Ok(hex(&hasher.finalize()))
}

/// Reads `r` to its end, handing every chunk and the bytes read so far (that chunk included) to
/// `take`; a read interrupted by a signal is retried, another failure is `failed(error, bytes
/// read before it)`.
fn each_chunk(
    mut r: impl Read,
    mut take: impl FnMut(&[u8], u64) -> Result<()>,
    failed: impl FnOnce(io::Error, u64) -> Error,
) -> Result<()> {
    let (mut buf, mut done) = (vec![0u8; CHUNK_BYTES], 0u64);
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                done += n as u64;
                take(&buf[..n], done)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(e, done)),
        }
    }
}

/// Bytes read at a time from a download, an archive or one of its files.
const CHUNK_BYTES: usize = 1 << 16;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Downloads `url` into a temporary file in `dir` (removed when dropped), reporting to
/// `progress`; returns it with the MD5 of its bytes.
fn download(
    url: &str,
    dir: &Path,
    dataset: Dataset,
    progress: &mut dyn Progress,
) -> Result<(tempfile::NamedTempFile, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .user_agent(concat!("densenet/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    log::info!("Downloading {} from {url}", dataset.title());
    let mut response = agent.get(url).call().map_err(|e| request_error(url, e))?;
    let total = response.body().content_length();
    let body = response.body_mut().as_reader();
    let mut file = tempfile::Builder::new()
        .prefix(&format!(".{}.", dataset.archive()))
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(|e| Error(format!("cannot create a temporary file in {}: {e}", dir.display())))?;
    let (mut hasher, mut got) = (Md5::new(), 0);
    let write = |chunk: &[u8], done| {
        hasher.update(chunk);
        file.write_all(chunk)
            .map_err(|e| Error(format!("cannot write the download to {}: {e}", file.path().display())))?;
        got = done;
        progress.update(done, total);
        Ok(())
    };
    each_chunk(body, write, |e, got| {
        let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
        match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                Error(format!("download from {url} cut off after {got}{of} bytes (the connection closed early)"))
            }
            _ => Error(format!("download from {url} failed after {got}{of} bytes: {}", one_line(&e.to_string()))),
        }
    })?;
    progress.finish(got);
    if let Some(t) = total.filter(|&t| t != got) {
        bail!("download from {url} cut off after {got} of {t} bytes");
    }
    Ok((file, hex(&hasher.finalize())))
}

/// One line for a failed request.
fn request_error(url: &str, e: ureq::Error) -> Error {
    let offline = "; without network, get the archive elsewhere and pass --archive PATH";
    Error(match e {
        ureq::Error::StatusCode(code) => {
            let reason = ureq::http::StatusCode::from_u16(code).ok().and_then(|s| s.canonical_reason());
            format!("download from {url} failed: HTTP {code}{}", reason.map(|r| format!(" {r}")).unwrap_or_default())
        }
        ureq::Error::BadUri(why) => format!("bad URL '{url}': {why}"),
        ureq::Error::HostNotFound => format!("cannot download {url}: host not found{offline}"),
        ureq::Error::Io(io) => format!("cannot download {url}: {}{offline}", one_line(&io.to_string())),
        ureq::Error::Timeout(t) => format!("cannot download {url}: timed out ({t}){offline}"),
        ureq::Error::ConnectionFailed => format!("cannot download {url}: connection failed{offline}"),
        e => format!("cannot download {url}: {}", one_line(&e.to_string())),
    })
}

/// Extracts the dataset's folder from the archive into a temporary directory in `dir`, reads
/// its files back, then renames it into place.
fn extract(archive: &Path, dir: &Path, dataset: Dataset, origin: &str) -> Result<Fetched> {
    let folder = dataset.folder();
    log::info!("Extracting {folder}/ into {}", dir.display());
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{folder}."))
        .tempdir_in(dir)
        .map_err(|e| Error(format!("cannot create a temporary directory in {}: {e}", dir.display())))?;
    let root = staging.path().join(folder);
    let written = |e: io::Error| Error(format!("cannot write into {}: {e}", dir.display()));
    fs::create_dir(&root).map_err(written)?;

    let cannot = |e: io::Error| Error(format!("cannot read the archive {origin}: {e}"));
    let mut file = File::open(archive).map_err(cannot)?;
    let mut magic = Vec::with_capacity(2);
    (&mut file).take(2).read_to_end(&mut magic).map_err(cannot)?;
    match magic[..] {
        [] => bail!("the archive {origin} is empty; nothing was extracted"),
        [0x1f, 0x8b] => {}
        [b'<', ..] => bail!("the archive {origin} is not a gzip file (an HTML page?); nothing was extracted"),
        _ => bail!("the archive {origin} is not a gzip file; nothing was extracted"),
    }
    file.rewind().map_err(cannot)?;
    let gz = GzDecoder::new(BufReader::with_capacity(1 << 20, file));
    let create = |name: &str| File::create(root.join(name)).map_err(written);
    let close = |out: File| out.sync_all().map_err(written);
    let Unpacked { names, elsewhere } = unpack(gz, dataset, origin, create, close)?;

    let expected = [Split::Train, Split::Test].into_iter().flat_map(|s| dataset.files(s));
    let missing: Vec<&str> = expected.into_iter().copied().filter(|f| !names.iter().any(|n| n == f)).collect();
    if !missing.is_empty() {
        let instead = match elsewhere {
            Some(top) if names.is_empty() => format!(" (it holds {top}/ instead)"),
            _ => String::new(),
        };
        bail!("the archive {origin} has no {folder}/{}{instead}; nothing was extracted", missing.join(", "));
    }
    let prefix = format!("{}/", staging.path().display());
    let load = |split| {
        Images::load(staging.path(), dataset, split).map_err(|e| {
            Error(format!("the archive {origin} is unusable: {}; nothing was extracted", e.0.replace(&prefix, "")))
        })
    };
    let (train, test) = (load(Split::Train)?.len(), load(Split::Test)?.len());

    let target = dir.join(folder);
    if let Err(e) = fs::rename(&root, &target) {
        if target.exists() {
            // Put there by someone else meanwhile: keep theirs if it is whole.
            return present(dir, dataset);
        }
        bail!("cannot move the extracted {folder}/ into {}: {e}", dir.display());
    }
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Fetched { folder: target, train, test, already_there: false })
}

/// What [`unpack`] took from an archive.
struct Unpacked {
    /// The names of the files taken, in archive order.
    names: Vec<String>,
    /// The first top-level folder other than the dataset's, if any.
    elsewhere: Option<String>,
}

/// Most files taken from the dataset's folder of an archive (the official ones hold 8 and 4).
const MAX_FILES: usize = 64;
/// Most records in one file of a dataset's folder (the official training sets hold 50,000 in
/// all: CIFAR-100's in one file).
const MAX_FILE_RECORDS: u64 = 50_000;

/// The extraction policy. Of the tar stream `tar`, only regular files directly in the
/// dataset's folder are taken: each is written to `create(name)`, `name` a plain file name
/// (never a path, a link, a device or a folder), and handed to `close`. Every other entry is
/// skipped. At most [`MAX_FILES`] files of at most [`MAX_FILE_RECORDS`] records each are
/// taken, so that no archive can fill the disk. The stream is read to its end, so that a gzip
/// stream's length and CRC are checked.
fn unpack<R: Read, W: Write>(
    tar: R,
    dataset: Dataset,
    origin: &str,
    mut create: impl FnMut(&str) -> Result<W>,
    mut close: impl FnMut(W) -> Result<()>,
) -> Result<Unpacked> {
    let (folder, max_bytes) = (dataset.folder(), MAX_FILE_RECORDS * dataset.record_bytes() as u64);
    let mut tar = tar::Archive::new(tar);
    let bad = |e: io::Error| archive_error(origin, &e);
    let (mut names, mut elsewhere) = (Vec::new(), None);
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let parts: Vec<Component> = path.components().filter(|c| *c != Component::CurDir).collect();
        let kind = entry.header().entry_type();
        match parts[..] {
            [Component::Normal(top), Component::Normal(name)]
                if top == folder && matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) =>
            {
                let name = name.to_string_lossy().into_owned();
                if names.len() == MAX_FILES {
                    bail!("the archive {origin} holds more than {MAX_FILES} files in {folder}/: not a CIFAR archive; nothing was extracted");
                }
                let mut out = create(&name)?;
                let write = |chunk: &[u8], bytes| {
                    if bytes > max_bytes {
                        bail!(
                            "the archive {origin} holds {folder}/{name} of more than {max_bytes} bytes, more than any {} \
                             file; nothing was extracted",
                            dataset.title()
                        );
                    }
                    out.write_all(chunk).map_err(|e| {
                        Error(format!("cannot write {folder}/{name} from {origin}: {e}; nothing was extracted"))
                    })
                };
                each_chunk(&mut entry, write, |e, _| bad(e))?;
                close(out)?;
                names.push(name);
            }
            [Component::Normal(top), ..] if top != folder => {
                elsewhere.get_or_insert_with(|| top.to_string_lossy().into_owned());
            }
            _ => {}
        }
    }
    // The rest of the stream (of a gzip stream, its length and CRC).
    io::copy(&mut tar.into_inner(), &mut io::sink()).map_err(bad)?;
    Ok(Unpacked { names, elsewhere })
}

/// One line for an archive that cannot be read: truncated or corrupt.
fn archive_error(origin: &str, e: &io::Error) -> Error {
    // The innermost message: tar wraps the cause in a description of what it was doing.
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    // Up to the first unprintable character: tar quotes the raw bytes of a bad header.
    let cause = cause.to_string();
    let printable = cause.split(|c: char| !(c == ' ' || c.is_ascii_graphic())).next().unwrap_or("");
    let cause = printable.trim_end_matches([' ', ':']);
    let what = if e.kind() == io::ErrorKind::UnexpectedEof { "is truncated" } else { "is corrupt" };
    let cause = if cause.is_empty() { String::new() } else { format!(" ({cause})") };
    Error(format!("the archive {origin} {what}{cause}; nothing was extracted"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::records;
    use flate2::write::GzEncoder;

    /// A CIFAR-10 tar.gz with `n` records per file.
    fn archive(n: usize) -> Vec<u8> {
        let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let splits = [Split::Train, Split::Test];
        for name in splits.iter().flat_map(|&s| Dataset::Cifar10.files(s)) {
            let data = records(Dataset::Cifar10, n);
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, format!("cifar-10-batches-bin/{name}"), &data[..]).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// A tar stream (not compressed) of `entries`: (type, path, link name, contents).
    fn tar_of(entries: &[(tar::EntryType, &str, &str, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for &(kind, path, link, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            if !link.is_empty() {
                header.set_link_name(link).unwrap();
            }
            if path.len() > 100 {
                tar.append_data(&mut header, path, data).unwrap(); // with a GNU long-name entry
            } else {
                // Written raw: the builder refuses the '..' of hostile paths.
                header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
                header.set_cksum();
                tar.append(&header, data).unwrap();
            }
        }
        tar.into_inner().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    /// Where the 512-byte headers of a tar stream start.
    fn headers(tar: &[u8]) -> Vec<usize> {
        let (mut at, mut out) = (0, Vec::new());
        while at + 512 <= tar.len() && tar[at] != 0 {
            out.push(at);
            let size = std::str::from_utf8(&tar[at + 124..at + 135])
                .ok()
                .and_then(|s| u64::from_str_radix(s.trim_matches(['\0', ' ']), 8).ok());
            at += 512 + (size.unwrap_or(0) as usize).next_multiple_of(512);
        }
        out
    }

    /// Structure-aware fuzzing of the archive reader and the extraction policy: a valid
    /// CIFAR-10 tar stream mutated in its headers (entry types, with link targets; paths that
    /// climb out, are absolute, nest deeper, name the folder itself or are not UTF-8; sizes;
    /// checksums left wrong or fixed), with hostile entries inserted (links, folders, devices,
    /// GNU long names, pax paths), truncated or flipped, then gzipped, or its gzip stream
    /// truncated or flipped. A fixed seeded budget: no panic, every rejection one line, and
    /// every file taken a plain name in the dataset's folder; how many got past the first check
    /// (the gzip and tar framing of the first entry) is the README's count.
    #[test]
    fn fuzzed_archives_never_escape_the_dataset_folder() {
        use tar::EntryType as T;
        const CASES: u64 = 20_000;
        let record = records(Dataset::Cifar10, 1);
        let mut entries: Vec<(T, String, &str, &[u8])> = vec![(T::Directory, "cifar-10-batches-bin/".into(), "", b"")];
        for name in [Split::Train, Split::Test].iter().flat_map(|&s| Dataset::Cifar10.files(s)) {
            entries.push((T::Regular, format!("cifar-10-batches-bin/{name}"), "", &record));
        }
        entries.push((T::Regular, "cifar-10-batches-bin/readme.html".into(), "", b"<html></html>"));
        let listed: Vec<_> = entries.iter().map(|(k, p, l, d)| (*k, p.as_str(), *l, *d)).collect();
        let seed = tar_of(&listed);
        let blocks = headers(&seed);
        assert_eq!(blocks.len(), entries.len());
        let long = format!("cifar-10-batches-bin/{}", "a".repeat(150));
        let hostile: Vec<Vec<u8>> = [
            (T::Symlink, "cifar-10-batches-bin/data_batch_1.bin", "/etc/passwd"),
            (T::Link, "cifar-10-batches-bin/data_batch_2.bin", "../../x"),
            (T::Directory, "cifar-10-batches-bin/test_batch.bin", ""),
            (T::Char, "cifar-10-batches-bin/data_batch_3.bin", ""),
            (T::Fifo, "cifar-10-batches-bin/data_batch_4.bin", ""),
            (T::Regular, &long, ""),
            (T::Regular, "../escape.bin", ""),
            (T::Regular, "cifar-10-batches-bin/../../escape.bin", ""),
        ]
        .iter()
        .map(|&(k, p, l)| {
            let t = tar_of(&[(k, p, l, if k == T::Regular { &record[..] } else { b"" })]);
            t[..t.len() - 1024].to_vec() // without the end-of-archive blocks
        })
        .chain(std::iter::once({
            // A pax header whose path climbs out, then the file it renames.
            let pax = b"30 path=../../../pax-escape\n";
            let t = tar_of(&[(T::XHeader, "pax", "", &pax[..27]), (T::Regular, "cifar-10-batches-bin/x", "", b"data")]);
            t[..t.len() - 1024].to_vec()
        }))
        .collect();
        let paths: [&[u8]; 12] = [
            b"../escape",
            b"/abs/data_batch_1.bin",
            b"cifar-10-batches-bin/../../evil",
            b"cifar-10-batches-bin/sub/x",
            b"./cifar-10-batches-bin/data_batch_1.bin",
            b"cifar-10-batches-bin/",
            b"cifar-10-batches-bin/..",
            b"other/data_batch_1.bin",
            b"",
            b"cifar-10-batches-bin//x",
            b"cifar-10-batches-bin/\xff\xfe",
            &[b'a'; 100],
        ];
        let types = b"0125346LKxgSV\0?";
        let sizes: [&[u8]; 6] = [
            b"00000000000",
            b"00000010000",
            b"77777777777",
            b"zzzzzzzzzzz",
            b"\x80\0\0\0\0\0\0\xff\xff\xff\xff",
            b"00000000001",
        ];
        let (mut past_first, mut extracted) = (0, 0);
        for case in 0..CASES {
            let r = |k: u64| crate::rng::derive(crate::rng::derive(0x7a2, case), k);
            let pick = |k: u64, n: usize| (r(k) % n as u64) as usize;
            let mut tar = seed.clone();
            let at = blocks[pick(1, blocks.len())];
            let kind = r(0) % 8;
            match kind {
                0 => {
                    tar[at + 156] = types[pick(2, types.len())];
                    tar[at + 157..at + 257].fill(0);
                    let link: &[u8] =
                        [&b"/etc/passwd"[..], b"../../x", b"cifar-10-batches-bin/data_batch_5.bin"][pick(3, 3)];
                    tar[at + 157..at + 157 + link.len()].copy_from_slice(link);
                }
                1 => {
                    let p = paths[pick(2, paths.len())];
                    tar[at..at + 100].fill(0);
                    tar[at..at + p.len()].copy_from_slice(p);
                }
                2 => tar[at + 124..at + 135].copy_from_slice(sizes[pick(2, sizes.len())]),
                3 => {
                    let insert = blocks.get(pick(2, blocks.len() + 1)).copied().unwrap_or(seed.len() - 1024);
                    tar.splice(insert..insert, hostile[pick(3, hostile.len())].iter().copied());
                }
                4 => tar.truncate(pick(2, tar.len())),
                5 | 6 => {
                    for k in 0..1 + r(2) % 4 {
                        let at = if kind == 5 { pick(10 + k, tar.len()) } else { at + pick(10 + k, 512) };
                        tar[at] ^= 1 << (r(20 + k) % 8);
                    }
                }
                _ => {}
            }
            // Headers edited by kinds 0 to 2 mostly get a right checksum, to reach the policy.
            if kind <= 2 && r(4) % 4 != 0 {
                let mut header = tar::Header::new_old();
                header.as_mut_bytes().copy_from_slice(&tar[at..at + 512]);
                header.set_cksum();
                tar[at..at + 512].copy_from_slice(header.as_bytes());
            }
            let mut gz = gzip(&tar);
            if kind == 7 {
                if r(5) % 2 == 0 {
                    gz.truncate(pick(6, gz.len()));
                } else {
                    let at = pick(6, gz.len());
                    gz[at] ^= 1 << (r(7) % 8);
                }
            }
            let taken = std::cell::Cell::new(0);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let create = |name: &str| {
                    assert!(
                        !name.is_empty() && name != "." && name != ".." && !name.contains('/'),
                        "case {case}: {name:?}"
                    );
                    taken.set(taken.get() + 1);
                    Ok(Vec::new())
                };
                unpack(GzDecoder::new(&gz[..]), Dataset::Cifar10, "fuzz.tgz", create, |_| Ok(()))
            }));
            match outcome {
                Err(_) => panic!("case {case} (mutation {kind}) panicked"),
                Ok(Ok(u)) => {
                    (past_first, extracted) = (past_first + 1, extracted + 1);
                    assert_eq!(u.names.len(), taken.get());
                }
                Ok(Err(e)) => {
                    assert!(!e.0.contains('\n') && e.0.starts_with("the archive fuzz.tgz "), "case {case}: {e}");
                    past_first += (taken.get() > 0) as u64;
                }
            }
        }
        let parser = "tar.gz archive and extraction policy";
        crate::testing::Tally { parser, cases: CASES, counts: vec![past_first, extracted] }.check();
    }

    /// No archive fills the disk: more than [`MAX_FILES`] files in the folder, or a file of
    /// more than [`MAX_FILE_RECORDS`] records, is refused as it is read.
    #[test]
    fn archives_too_large_for_cifar_are_refused() {
        let unpacked =
            |gz: &[u8]| unpack(GzDecoder::new(gz), Dataset::Cifar10, "x.tgz", |_| Ok(io::sink()), |_| Ok(()));
        let many: Vec<String> = (0..=MAX_FILES).map(|i| format!("cifar-10-batches-bin/f{i}")).collect();
        let entries: Vec<_> = many.iter().map(|p| (tar::EntryType::Regular, p.as_str(), "", &b"x"[..])).collect();
        let e = unpacked(&gzip(&tar_of(&entries[..MAX_FILES]))).map(|u| u.names.len());
        assert_eq!(e.ok(), Some(MAX_FILES));
        let e = unpacked(&gzip(&tar_of(&entries))).err().unwrap().0;
        assert!(e.contains(&format!("holds more than {MAX_FILES} files in cifar-10-batches-bin/")), "{e}");

        let cap = MAX_FILE_RECORDS * Dataset::Cifar10.record_bytes() as u64;
        let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut header = tar::Header::new_gnu();
        header.set_size(cap + 1);
        header.set_mode(0o644);
        tar.append_data(&mut header, "cifar-10-batches-bin/data_batch_1.bin", io::repeat(0).take(cap + 1)).unwrap();
        let e = unpacked(&tar.into_inner().unwrap().finish().unwrap()).err().unwrap().0;
        assert!(e.contains(&format!("data_batch_1.bin of more than {cap} bytes, more than any CIFAR-10 file")), "{e}");
    }

    #[test]
    fn the_official_source_needs_the_official_md5() {
        let dir = tempfile::TempDir::new().unwrap();
        let file = dir.path().join("a.tar.gz");
        fs::write(&file, archive(2)).unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        let md5 = md5_file(&file).unwrap();
        let e = install(&data, Dataset::Cifar10, &file, &md5, "https://x", true).unwrap_err().0;
        assert!(e.starts_with(&format!("https://x: MD5 {md5} does not match the official CIFAR-10 archive's")), "{e}");
        assert!(listing(&data).is_empty());

        let done = install(&data, Dataset::Cifar10, &file, &md5, "mirror", false).unwrap();
        assert_eq!((done.train, done.test, done.already_there), (10, 2, false));
        assert_eq!(listing(&data), ["cifar-10-batches-bin"]);
    }

    #[test]
    fn md5_of_a_file() {
        let dir = tempfile::TempDir::new().unwrap();
        let file = dir.path().join("x");
        fs::write(&file, b"abc").unwrap();
        assert_eq!(md5_file(&file).unwrap(), "900150983cd24fb0d6963f7d28e17f72");
        assert!(md5_file(dir.path()).unwrap_err().0.contains("not a file"));
    }

    #[test]
    fn created_directories_are_listed_deepest_first() {
        let dir = tempfile::TempDir::new().unwrap();
        let deep = dir.path().join("a/b");
        assert_eq!(create_dirs(&deep).unwrap(), [deep.clone(), dir.path().join("a")]);
        assert!(deep.is_dir());
        assert!(create_dirs(&deep).unwrap().is_empty());
    }
}
