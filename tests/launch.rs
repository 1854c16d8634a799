//! Data-parallel jobs as separate processes through the command line, on the host device
//! (docs/launch.md): `--nproc` and processes started by hand with torchrun's variables train
//! as one process does, rank 0 alone writes the run, and a job stops with an error naming the
//! rank when one fails, hangs or cannot be reached.

mod common;

use common::cifar::{self, Format};
use common::norm_rel;
use densenet::train::checkpoint::{Checkpoint, State};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use tempfile::TempDir;

/// 40 training images (5 steps of 8, or 6 of 7 with an uneven last batch) and 12 test images.
fn data() -> TempDir {
    let dir = TempDir::new().unwrap();
    cifar::write(dir.path(), Format::Cifar10, true, 40, 12);
    dir
}

/// `densenet train` of the tiny network on the host device into `runs`, with `extra` flags.
fn train_cmd(data: &Path, runs: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_densenet"));
    c.args(["train", "--data-dir", data.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()]);
    c.args(["--device", "host", "--layers", "10", "--growth", "4", "--seed", "3", "--name", "r"]);
    c.args(extra);
    c
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn state(runs: &Path) -> State {
    Checkpoint::read(&runs.join("r/checkpoint.safetensors")).unwrap().state().unwrap()
}

fn assert_close(what: &str, got: &State, want: &State) {
    for (name, g, w) in [
        ("parameters", &got.params, &want.params),
        ("momentum", &got.momentum, &want.momentum),
        ("running", &got.running, &want.running),
    ] {
        let e = norm_rel(g, w);
        assert!(e <= 1e-5, "{what}: {name} relative error {e:e}");
    }
    assert_eq!(got.steps, want.steps, "{what}: steps");
}

/// The epoch summaries of a run's stdout (loss and precision, without the time).
fn summaries(out: &Output) -> Vec<String> {
    text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(" * Epoch"))
        .map(|l| l.rsplit_once("  (").map_or(l, |(a, _)| a).to_string())
        .collect()
}

/// `--nproc 2` and `--nproc 3` with synchronized BN end where one process does, in every memory
/// mode, with dropout and augmentation and without, with uneven shards and an uneven last
/// batch; only rank 0 prints and writes the run.
#[test]
fn ranks_train_as_one_process_does() {
    let data = data();
    for mode in ["naive", "shared", "minimal"] {
        for (drop, augment) in [(true, true), (false, false)] {
            let mut flags = vec!["--memory", mode, "--epochs", "1"];
            flags.extend(if drop { &["--droprate", "0.2"][..] } else { &["--no-augment", "--droprate", "0"][..] });
            for (world, batch) in [("2", "7"), ("3", "8")] {
                let at = format!("{mode} drop {drop} augment {augment} --nproc {world} -b {batch}");
                let one = TempDir::new().unwrap();
                let solo = run(train_cmd(data.path(), one.path(), &[&flags[..], &["-b", batch]].concat()));
                assert!(solo.status.success(), "{at}: one process: {}", text(&solo.stderr));
                let job = TempDir::new().unwrap();
                let out =
                    run(train_cmd(data.path(), job.path(), &[&flags[..], &["-b", batch, "--nproc", world]].concat()));
                assert!(out.status.success(), "{at}: {}", text(&out.stderr));
                assert_close(&at, &state(job.path()), &state(one.path()));
                assert_eq!(summaries(&out), summaries(&solo), "{at}: the epoch's losses and precisions");
                assert_eq!(text(&out.stdout).matches("Best accuracy").count(), 1, "{at}: only rank 0 reports");
                assert!(text(&out.stdout).contains(&format!("Data parallel (experimental): {world} ranks")), "{at}");
                let files: Vec<_> =
                    std::fs::read_dir(job.path().join("r")).unwrap().map(|e| e.unwrap().file_name()).collect();
                assert_eq!(files.len(), 3, "{at}: {files:?}: one run's files (checkpoint, best, lock)");
            }
        }
    }
}

/// A job resumes on another rank count: 1 epoch with 2 ranks, then 1 more with 3, equals 2
/// epochs of one process; `--bn local` trains and resumes too.
#[test]
fn a_job_resumes_on_any_rank_count() {
    let data = data();
    let flags = ["-b", "8", "--droprate", "0.2"];
    let one = TempDir::new().unwrap();
    let solo = run(train_cmd(data.path(), one.path(), &[&flags[..], &["--epochs", "2"]].concat()));
    assert!(solo.status.success(), "{}", text(&solo.stderr));
    let job = TempDir::new().unwrap();
    let first = run(train_cmd(data.path(), job.path(), &[&flags[..], &["--epochs", "1", "--nproc", "2"]].concat()));
    assert!(first.status.success(), "{}", text(&first.stderr));
    let ck = job.path().join("r/checkpoint.safetensors");
    let resume = ["--resume", ck.to_str().unwrap(), "--change-recipe", "--epochs", "2", "--nproc", "3"];
    let second = run(train_cmd(data.path(), job.path(), &resume));
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert_close("2 ranks, then 3", &state(job.path()), &state(one.path()));
    // The BN mode is recipe: a resume keeps it, and changing it needs --change-recipe.
    let local = TempDir::new().unwrap();
    let first = [&flags[..], &["--epochs", "1", "--nproc", "2", "--bn", "local"]].concat();
    let out = run(train_cmd(data.path(), local.path(), &first));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("BN local"), "{}", text(&out.stdout));
    let ck = local.path().join("r/checkpoint.safetensors");
    let resume = ["--resume", ck.to_str().unwrap(), "--change-recipe", "--epochs", "2", "--nproc", "2"];
    let out = run(train_cmd(data.path(), local.path(), &resume));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("BN local"), "{}", text(&out.stdout));
    let out = run(train_cmd(data.path(), local.path(), &["--resume", ck.to_str().unwrap(), "--bn", "sync"]));
    common::run::assert_one_line_error(
        &out,
        1,
        &["--bn local in the checkpoint, sync here", "--change-recipe"],
        "--bn",
    );
}

/// A port no one listens on now.
fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string()
}

/// Rank `rank` of `world` started by hand with torchrun's variables.
fn rank_cmd(data: &Path, runs: &Path, rank: usize, world: usize, port: &str, extra: &[&str]) -> Command {
    let mut c = train_cmd(data, runs, extra);
    c.envs([("RANK", rank.to_string()), ("WORLD_SIZE", world.to_string()), ("LOCAL_RANK", rank.to_string())]);
    c.envs([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1"), ("DENSENET_PORT", port)]);
    c
}

/// Waits until `child` (stdout piped) prints a training progress line.
fn wait_for_progress(child: &mut Child) {
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines {
        if line.unwrap().starts_with("Epoch: [0][") {
            return;
        }
    }
    panic!("rank 0 ended without training");
}

/// Two processes started by hand with torchrun's variables train as one does; a rank killed
/// mid-run stops the other with an error naming it; a rank that stops answering trips the
/// watchdog.
#[test]
fn ranks_started_by_hand_meet_and_fail_together() {
    let data = data();
    let flags = ["-b", "8", "--epochs", "1"];
    let one = TempDir::new().unwrap();
    assert!(run(train_cmd(data.path(), one.path(), &flags)).status.success());
    let job = TempDir::new().unwrap();
    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|r| rank_cmd(data.path(), job.path(), r, 2, &port, &flags).stdout(Stdio::null()).spawn().unwrap())
        .collect();
    for (r, c) in ranks.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "rank {r}: {}", text(&out.stderr));
    }
    assert_close("ranks by hand", &state(job.path()), &state(one.path()));

    // Long runs, stopped while they train.
    let long = ["-b", "2", "--epochs", "50", "--print-freq", "1", "--timeout", "3"];
    for (signal, want) in [
        ("-KILL", "rank 1 left the job during collective"),
        ("-STOP", "did not finish within 3 s: rank 1 did not take part"),
    ] {
        let runs = TempDir::new().unwrap();
        let port = free_port();
        let mut r0 = rank_cmd(data.path(), runs.path(), 0, 2, &port, &long)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut r1 = rank_cmd(data.path(), runs.path(), 1, 2, &port, &long).stderr(Stdio::null()).spawn().unwrap();
        wait_for_progress(&mut r0);
        assert!(Command::new("kill").args([signal, &r1.id().to_string()]).status().unwrap().success());
        let out = r0.wait_with_output().unwrap();
        let _ = r1.kill();
        let _ = r1.wait();
        common::run::assert_one_line_error(&out, 1, &["rank 0: ", want], signal);
    }
}

/// `--nproc`: a rank killed mid-run stops the job, which names it; a signal stops every rank;
/// errors before training are one line each.
#[test]
fn nproc_stops_the_job_when_a_rank_fails() {
    let data = data();
    let runs = TempDir::new().unwrap();
    let long = ["-b", "2", "--epochs", "50", "--print-freq", "1", "--nproc", "2"];
    let mut parent =
        train_cmd(data.path(), runs.path(), &long).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_progress(&mut parent);
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", parent.id())).unwrap();
    let pids: Vec<&str> = children.split_whitespace().collect();
    assert_eq!(pids.len(), 2, "{children}");
    assert!(Command::new("kill").args(["-KILL", pids[1]]).status().unwrap().success());
    let out = parent.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.lines().last().unwrap().contains("error: rank 1 of 2 stopped (killed by signal 9); the job was stopped"),
        "{err}"
    );
    assert!(err.contains("error: rank 0: rank 1 left the job"), "{err}");

    // SIGINT to the starter reaches every rank once: rank 0 says how to resume, the others
    // that they stopped, and the job ends as a signal's.
    let runs = TempDir::new().unwrap();
    let mut parent =
        train_cmd(data.path(), runs.path(), &long).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_progress(&mut parent);
    assert!(Command::new("kill").args(["-INT", &parent.id().to_string()]).status().unwrap().success());
    let out = parent.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert_eq!(err.matches("interrupted by SIGINT").count(), 1, "{err}");
    assert!(err.contains("error: rank 0: interrupted by SIGINT") && err.contains("--nproc 2"), "{err}");
    assert!(err.contains("error: rank 1: stopped by signal 2"), "{err}");

    // Refused before any rank starts, or by every rank before it trains.
    let refused = [
        (vec!["--nproc", "2", "--download"], 2, "--download in a job of several ranks"),
        (vec!["--nproc", "3", "-b", "2"], 2, "leaves a rank without one"),
        (vec!["--nproc", "2", "--bn", "both"], 2, "unknown batch-norm mode 'both'"),
        (vec!["--nproc", "0"], 2, "--nproc"),
    ];
    for (flags, code, needle) in refused {
        let out = run(train_cmd(data.path(), runs.path(), &flags));
        assert_eq!(out.status.code(), Some(code), "{flags:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(needle), "{flags:?}: {}", text(&out.stderr));
    }
}

/// A rank that cannot reach rank 0, and a rank 0 that the others never reach, stop after the
/// timeout with a message saying so; started by torchrun, `--nproc` is refused.
#[test]
fn ranks_that_do_not_meet_say_so() {
    let (data, runs) = (data(), TempDir::new().unwrap());
    let port = free_port();
    let out = run(rank_cmd(data.path(), runs.path(), 1, 2, &port, &["--timeout", "1"]));
    common::run::assert_one_line_error(
        &out,
        1,
        &["rank 1: rank 1 could not reach rank 0 at 127.0.0.1:", "within 1 s"],
        "rank 1",
    );
    let out = run(rank_cmd(data.path(), runs.path(), 0, 3, &port, &["--timeout", "1"]));
    common::run::assert_one_line_error(
        &out,
        1,
        &["rank 0: rank 0 waited 1 s on port", "rank(s) 1, 2 of 3 did not come"],
        "rank 0",
    );
    let mut c = rank_cmd(data.path(), runs.path(), 1, 2, &port, &["--timeout", "1"]);
    c.env("MASTER_ADDR", "no-such-host.invalid");
    common::run::assert_one_line_error(
        &run(c),
        1,
        &["rank 1 cannot resolve rank 0's host 'no-such-host.invalid'"],
        "host",
    );
    let out = run(rank_cmd(data.path(), runs.path(), 0, 2, &port, &["--nproc", "2"]));
    common::run::assert_one_line_error(
        &out,
        2,
        &["--nproc starts ranks, and this process already is rank 0 of 2"],
        "nproc",
    );
    assert_eq!(std::fs::read_dir(runs.path()).unwrap().count(), 0, "the runs directory was touched");
}
