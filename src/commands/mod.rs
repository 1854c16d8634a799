//! The subcommands, one module each with its own arguments, and what they share: the argument
//! groups ([`args`]), the value parsers ([`parse`]), the terminal ([`output`], [`progress`])
//! and the device ([`device`]).

pub(crate) mod args;
pub(crate) mod bench;
pub(crate) mod device;
pub(crate) mod download;
pub(crate) mod eval;
pub(crate) mod export;
pub(crate) mod memory;
pub(crate) mod output;
pub(crate) mod parse;
pub(crate) mod progress;
pub(crate) mod train;

use std::fmt;

/// Why a command failed: the one-line message and the exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    /// The exit code: 2 for bad flags, 1 for failures while running, 128 + N for signal N.
    pub(crate) code: u8,
    /// The message, without the `error: ` the terminal shows before it.
    pub(crate) message: String,
}

impl From<densenet::Error> for Failure {
    fn from(e: densenet::Error) -> Failure {
        failure(e)
    }
}

/// A bad flag value found after parsing: the usage exit code.
pub(crate) fn usage(message: impl fmt::Display) -> Failure {
    Failure { code: 2, message: message.to_string() }
}

/// A failure while running (exit code 1).
pub(crate) fn failure(message: impl fmt::Display) -> Failure {
    Failure { code: 1, message: message.to_string() }
}

/// What a command returns.
pub(crate) type Outcome = Result<(), Failure>;
