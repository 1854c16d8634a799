//! Running the `densenet` binary from the end-to-end tests.

use std::process::{Command, Output};
use tempfile::TempDir;

/// Runs the binary in a fresh working directory (where the default `runs/` goes).
pub fn densenet(args: &[&str]) -> Output {
    let cwd = TempDir::new().unwrap();
    Command::new(env!("CARGO_BIN_EXE_densenet"))
        .args(args)
        .current_dir(cwd.path())
        .output()
        .expect("run the densenet binary")
}

/// Asserts that `out` failed with exit code `code`, with no panic and one line on stderr,
/// `error: ...`, containing every needle; `what` names the run in messages.
pub fn assert_one_line_error(out: &Output, code: i32, needles: &[&str], what: &str) {
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(out.status.code(), Some(code), "{what}: stderr {err}");
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    assert_eq!(err.lines().count(), 1, "{what}: not one line: {err}");
    assert!(err.starts_with("error: "), "{what}: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{what}: '{needle}' not in {err}");
    }
}

/// Runs `args` and asserts a one-line error with exit code `code` containing `needle`.
pub fn assert_fails(args: &[&str], code: i32, needle: &str) {
    assert_one_line_error(&densenet(args), code, &[needle], &format!("{args:?}"));
}
