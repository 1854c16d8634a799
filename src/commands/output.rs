//! What the command line writes: result lines on stdout, the library's log records and the
//! one-line errors on stderr, and the exit status. Nothing else in the program prints.

use super::{progress, Outcome};
use clap::error::ErrorKind;
use serde::Serialize;
use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// Prints one line to stdout (above a progress bar, if one is drawn). Once stdout is closed
/// (`densenet train | head`), the lines are dropped and the work goes on: a run keeps training
/// and checkpointing, `eval | head -1` ends quietly. Any other failure to write is an error.
pub(crate) fn report(line: impl fmt::Display) -> densenet::Result<()> {
    if CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    match progress::suspend(|| writeln!(std::io::stdout(), "{line}")) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        r => r.map_err(|e| densenet::Error(format!("cannot write to stdout: {e}"))),
    }
}

/// Set once stdout is closed (a broken pipe), or this process's reports are silenced.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Silences [`report`] from now on: a data-parallel rank other than rank 0, which reports the
/// job (errors and warnings still go to stderr).
pub(crate) fn quiet() {
    CLOSED.store(true, Ordering::Relaxed);
}

/// Prints `value` as one line of JSON (a `--json` report: its type is the documented schema).
pub(crate) fn report_json(value: &impl Serialize) -> densenet::Result<()> {
    let json = serde_json::to_string(value).map_err(|e| densenet::Error(format!("cannot write JSON: {e}")))?;
    report(json)
}

/// Prints the library's log records on stderr (above a progress bar, if one is drawn): errors
/// as `error: ...`, warnings as `warning: ...`, notes as they are. Other crates' records are
/// not ours to show.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info && m.target().starts_with("densenet")
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let tag = match r.level() {
                log::Level::Error => "error: ",
                log::Level::Warn => "warning: ",
                _ => "",
            };
            progress::suspend(|| eprintln!("{tag}{}", r.args()));
        }
    }

    fn flush(&self) {}
}

/// Makes the library's log records appear on stderr.
pub(crate) fn show_log() {
    static LOGGER: Stderr = Stderr;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// The exit status of a command, after printing its error as one line.
pub(crate) fn exit(outcome: Outcome) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            progress::suspend(|| eprintln!("error: {}", f.message));
            ExitCode::from(f.code)
        }
    }
}

/// Help and version as clap prints them; every other parse error as one line with clap's tips.
pub(crate) fn clap_error(e: clap::Error) -> ExitCode {
    let code = ExitCode::from(e.exit_code() as u8);
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return code;
    }
    let text = e.to_string();
    // The first paragraph (a missing argument's name is on an indented line of its own), joined.
    let message: Vec<&str> = text.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
    let message = if message.is_empty() { "error: bad arguments".to_string() } else { message.join(" ") };
    let tips: Vec<&str> = text.lines().filter_map(|l| l.trim().strip_prefix("tip: ")).collect();
    if tips.is_empty() {
        eprintln!("{message}");
    } else {
        eprintln!("{message} ({})", tips.join("; "));
    }
    code
}

/// The `--json` schemas of the README, and the check of a report against one.
#[cfg(test)]
pub(crate) mod schema {
    use serde_json::Value;

    /// The schema block that follows the README's mention of `` `command` ``.
    fn readme(command: &str) -> Value {
        let readme = include_str!("../../README.md");
        let at = readme.find(&format!("`{command}`")).unwrap_or_else(|| panic!("the README never says `{command}`"));
        let block = readme[at..].split("```json\n").nth(1).and_then(|b| b.split("```").next());
        let block = block.unwrap_or_else(|| panic!("no JSON block after `{command}` in the README"));
        serde_json::from_str(block).unwrap_or_else(|e| panic!("the README's schema of `{command}`: {e}"))
    }

    /// Checks `report` (serialized) against the README's schema of `command` (see the README:
    /// `?` after a key, present only where said; `|null` after a type or an object's key;
    /// `<a|b>`, any of those keys).
    pub(crate) fn check(command: &str, report: &impl serde::Serialize) {
        let value = serde_json::to_value(report).unwrap();
        matches(&readme(command), &value, command);
    }

    /// A key of the schema: its name, whether it may be absent, whether its value may be null.
    fn key(name: &str) -> (&str, bool, bool) {
        let (name, nullable) = name.strip_suffix("|null").map_or((name, false), |n| (n, true));
        let (name, optional) = name.strip_suffix('?').map_or((name, false), |n| (n, true));
        (name, optional, nullable)
    }

    /// Whether schema key `name` describes the key `got`: the same, or one of `<a|b>`.
    fn describes(name: &str, got: &str) -> bool {
        match name.strip_prefix('<').and_then(|n| n.strip_suffix('>')) {
            Some(any) => any.split('|').any(|k| k == got),
            None => name == got,
        }
    }

    fn matches(schema: &Value, value: &Value, path: &str) {
        match (schema, value) {
            (Value::String(t), v) => {
                let (t, nullable) = t.strip_suffix("|null").map_or((t.as_str(), false), |t| (t, true));
                let ok = match v {
                    Value::Null => nullable,
                    Value::Number(n) => t == "number" || (t == "integer" && (n.is_u64() || n.is_i64())),
                    Value::String(_) => t == "string",
                    Value::Bool(_) => t == "bool",
                    _ => false,
                };
                assert!(ok, "{path}: {v} is not {t}{}", if nullable { "|null" } else { "" });
            }
            (Value::Array(items), Value::Array(got)) => {
                for (i, g) in got.iter().enumerate() {
                    matches(&items[0], g, &format!("{path}[{i}]"));
                }
            }
            (Value::Object(fields), Value::Object(got)) => {
                for (name, v) in got {
                    let described = fields.iter().find(|(k, _)| describes(key(k).0, name));
                    let (k, s) = described.unwrap_or_else(|| panic!("{path}.{name} is not in the README's schema"));
                    if !(v.is_null() && key(k).2) {
                        matches(s, v, &format!("{path}.{name}"));
                    }
                }
                for (k, _) in fields {
                    let (name, optional, _) = key(k);
                    assert!(optional || name.starts_with('<') || got.contains_key(name), "{path}.{name} is missing");
                }
            }
            (s, v) => panic!("{path}: {v} does not have the README's shape {s}"),
        }
    }
}
