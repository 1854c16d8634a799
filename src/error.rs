//! The crate's error type: one line of text, meant to be shown to the user as is.

use std::fmt;

/// An error with a one-line, user-facing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// `s` on one line: every run of whitespace (newlines included) one space, for messages that
/// quote text from outside (a server's reply, a file's contents).
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Returns early with an [`Error`] built from a format string.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error(format!($($arg)*)))
    };
}
