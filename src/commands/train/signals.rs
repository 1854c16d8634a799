//! Stopping a run on SIGINT or SIGTERM: after its current step, with the exact command that
//! resumes it.

use crate::commands::{failure, Failure};
use densenet::train::checkpoint::{self, Checkpoint};
use densenet::train::stop;
use std::path::Path;
use std::sync::Arc;

/// Seconds a run has, after SIGINT or SIGTERM, to finish its current step and stop.
const STOP_DEADLINE_S: u64 = 30;

/// The exit status of a run stopped by `signal`: 128 + its number (130 for SIGINT, 143 for
/// SIGTERM), as a shell reports it.
fn signal_status(signal: i32) -> u8 {
    (128 + signal).clamp(0, 255) as u8
}

/// SIGINT and SIGTERM ask the run to stop after its current step ([`stop`]); a second one, or
/// a step that does not end within [`STOP_DEADLINE_S`], ends the process at once (the last
/// checkpoint is whole either way: writes are atomic).
pub(crate) fn catch_signals() -> Result<(), Failure> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    use std::sync::atomic::AtomicBool;
    let stopping = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        let cannot = |e: std::io::Error| failure(format!("cannot catch signal {signal}: {e}"));
        // In this order: the second signal finds `stopping` set and exits.
        flag::register_conditional_shutdown(signal, signal_status(signal).into(), stopping.clone()).map_err(cannot)?;
        flag::register(signal, stopping.clone()).map_err(cannot)?;
        flag::register_usize(signal, stop::flag().clone(), signal as usize).map_err(cannot)?;
    }
    std::thread::spawn(|| {
        while stop::requested().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        std::thread::sleep(std::time::Duration::from_secs(STOP_DEADLINE_S));
        let signal = stop::requested().unwrap_or(SIGTERM);
        let message = format!("the current step did not end within {STOP_DEADLINE_S} s of signal {signal}: abandoned");
        crate::commands::progress::suspend(|| eprintln!("error: {message}"));
        std::process::exit(signal_status(signal).into());
    });
    Ok(())
}

/// The error of a run stopped by `signal`: where its last checkpoint is, and the exact
/// command that resumes it (this one with `--resume` appended: a repeated flag takes its last
/// value).
pub(crate) fn interrupted(signal: i32, run_dir: &Path) -> Failure {
    let name = match signal {
        signal_hook::consts::SIGINT => "SIGINT".to_string(),
        signal_hook::consts::SIGTERM => "SIGTERM".to_string(),
        s => format!("signal {s}"),
    };
    let args: Vec<String> = std::env::args().collect();
    let ck = run_dir.join(checkpoint::CHECKPOINT);
    let message = match Checkpoint::read(&ck) {
        Ok(c) => format!(
            "interrupted by {name}: the last checkpoint is {} (next epoch {}); resume with: {}",
            ck.display(),
            c.meta().epoch,
            resume_command(&args, &ck)
        ),
        Err(_) => format!(
            "interrupted by {name} before the first checkpoint; start again with: {}",
            args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
        ),
    };
    Failure { code: signal_status(signal), message }
}

/// The error of a rank other than 0 stopped by `signal` (rank 0 says how to resume).
pub(crate) fn stopped(signal: i32) -> Failure {
    Failure { code: signal_status(signal), message: format!("stopped by signal {signal} (rank 0 says how to resume)") }
}

/// The command that resumes the run of command line `args` from its checkpoint `ck`: the same
/// command (its recipe flags agree with the run's recipe) without what only starts a run
/// (`--init-weights`, `--start-epoch`), with `--resume ck` appended (a repeated flag takes
/// its last value).
fn resume_command(args: &[String], ck: &Path) -> String {
    let mut words = Vec::new();
    let mut skip = false;
    for a in args {
        let starting = ["--init-weights", "--start-epoch"].iter().find(|f| a == *f || a.starts_with(&format!("{f}=")));
        match (skip, starting) {
            (true, _) => skip = false,
            (false, Some(f)) => skip = a == *f,
            (false, None) => words.push(shell_quote(a)),
        }
    }
    words.extend(["--resume".to_string(), shell_quote(&ck.display().to_string())]);
    words.join(" ")
}

/// `s` as one shell word: unchanged when it holds only safe characters, else single-quoted.
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::resume_command;
    use std::path::Path;

    #[test]
    fn the_resume_command_drops_what_only_starts_a_run() {
        let args: Vec<String> = [
            "densenet",
            "train",
            "--init-weights",
            "w.safetensors",
            "--start-epoch=3",
            "--lr",
            "0.05",
            "--name",
            "a b",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            resume_command(&args, Path::new("runs/a b/checkpoint.safetensors")),
            "densenet train --lr 0.05 --name 'a b' --resume 'runs/a b/checkpoint.safetensors'"
        );
    }
}
