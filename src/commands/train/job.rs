//! Data-parallel training from the command line (docs/launch.md): `--nproc N` starts N ranks
//! of this command on this machine and stops them all when one fails; a rank (started by
//! `--nproc`, torchrun or srun) meets the others before anything else, so that a rank that
//! fails early stops the job instead of leaving the others waiting.

use crate::commands::device::DeviceArgs;
use crate::commands::{failure, parse, usage, Failure, Outcome};
use clap::Args;
use densenet::backend::cuda::GpuExec;
use densenet::comm::rendezvous::{rendezvous, Links};
use densenet::comm::{BnMode, Group, DEFAULT_TIMEOUT};
use densenet::launch::Rank;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The variable `--nproc N` sets in the ranks it starts (to N), so that each, seeing
/// `--nproc N` among its flags, trains as a rank instead of starting ranks of its own.
const STARTED_BY: &str = "DENSENET_NPROC";

/// How long the other ranks have to stop by themselves once one has failed (they notice at
/// their next collective) before they are killed.
const GRACE: Duration = Duration::from_secs(10);

/// The flags of a data-parallel job.
#[derive(Args)]
pub(crate) struct JobArgs {
    /// Start N ranks of this command on this machine, one per GPU (or N processes with
    /// --device cpu or host), each training a shard of every batch (-b stays the global
    /// batch); experimental until run on several GPUs (docs/launch.md).
    #[arg(long, value_name = "N", value_parser = parse::positive)]
    nproc: Option<usize>,
    /// Batch norm across ranks: sync (statistics of the global batch: the single-device step)
    /// or local (each rank's shard, as PyTorch's DDP; rank 0's running statistics are saved)
    /// [with --resume: the run's].
    #[arg(long, value_name = "MODE", default_value = "sync")]
    pub(crate) bn: BnMode,
    /// Seconds a rank waits for the others, at start-up and in every collective, before the
    /// job stops with an error naming what it waited for.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT.as_secs() as usize, value_parser = parse::positive)]
    timeout: usize,
}

/// What this process is in a job.
pub(crate) enum Role {
    /// It starts `--nproc` ranks and waits for them.
    Starter(usize),
    /// It trains alone.
    Alone,
    /// It trains as one rank of several.
    Rank(Rank),
}

impl JobArgs {
    /// The role of this process: from `--nproc` and the launcher's variables.
    pub(crate) fn role(&self) -> Result<Role, Failure> {
        let rank = Rank::of_process()?.filter(|r| r.world > 1);
        let started = std::env::var(STARTED_BY).ok();
        Ok(match (self.nproc, rank) {
            (Some(n), Some(r)) if started.as_deref() == Some(&n.to_string()) && r.world == n => Role::Rank(r),
            (Some(_), Some(r)) => {
                return Err(usage(format!(
                    "--nproc starts ranks, and this process already is rank {} of {} (started by {})",
                    r.rank, r.world, r.launcher
                )))
            }
            (Some(n), None) if n > 1 => Role::Starter(n),
            (_, Some(r)) => Role::Rank(r),
            (_, None) => Role::Alone,
        })
    }

    /// Meets the other ranks of `rank`'s job.
    pub(crate) fn meet(&self, rank: &Rank) -> densenet::Result<Links> {
        let group = Group { rank: rank.rank, world: rank.world };
        rendezvous(group, &rank.master_addr, rank.port, Duration::from_secs(self.timeout as u64))
    }
}

/// Starts `n` ranks of this command on this machine with torchrun's variables (ranks on the
/// CPU with an equal share of its cores each), and waits for them; when one fails, the others have [`GRACE`] to stop and are then killed, and the error
/// names the rank. SIGINT and SIGTERM are passed on to every rank (each in its own process
/// group, so that a terminal's Ctrl-C reaches them once).
pub(crate) fn start(n: usize, device: &DeviceArgs) -> Outcome {
    let gpus = device.wants_gpu().then(GpuExec::count);
    if let Some(gpus) = &gpus {
        enough_gpus(n, gpus.clone(), device.is_auto())?;
    }
    // Ranks on the CPU share its cores (rayon's pool in each), unless RAYON_NUM_THREADS says.
    let on_cpu = !matches!(gpus, Some(Ok(g)) if g > 0);
    let threads = (on_cpu && std::env::var_os("RAYON_NUM_THREADS").is_none()).then(|| {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        (cores / n).max(1).to_string()
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| failure(format!("cannot find a free port for the ranks to meet on: {e}")))?
        .port();
    let exe = std::env::current_exe().map_err(|e| failure(format!("cannot find this program to start ranks: {e}")))?;
    let signal = Arc::new(AtomicUsize::new(0));
    for s in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(s, signal.clone(), s as usize)
            .map_err(|e| failure(format!("cannot catch signal {s}: {e}")))?;
    }
    let mut ranks: Vec<Option<Child>> = Vec::new();
    for r in 0..n {
        let child = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .envs(
                [("RANK", r), ("LOCAL_RANK", r), ("WORLD_SIZE", n), ("LOCAL_WORLD_SIZE", n)]
                    .map(|(k, v)| (k, v.to_string())),
            )
            .envs([("MASTER_ADDR", "127.0.0.1".to_string()), ("MASTER_PORT", port.to_string())])
            .envs([("DENSENET_PORT", port.to_string()), (STARTED_BY, n.to_string())])
            .envs(threads.iter().map(|t| ("RAYON_NUM_THREADS", t)))
            .process_group(0)
            .spawn();
        match child {
            Ok(c) => ranks.push(Some(c)),
            Err(e) => {
                stop_all(&mut ranks, libc::SIGKILL);
                return Err(failure(format!("cannot start rank {r} of {n}: {e}")));
            }
        }
    }
    let (mut failed, mut deadline, mut passed) = (None::<(usize, ExitStatus)>, None, 0);
    while ranks.iter().any(Option::is_some) {
        let mut ended = Vec::new();
        for (r, slot) in ranks.iter_mut().enumerate() {
            match slot.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => ended.push((r, status)),
                Some(Err(e)) => return Err(failure(format!("cannot wait for rank {r} of {n}: {e}"))),
                _ => continue,
            }
            *slot = None;
        }
        // Of the ranks that failed since the last look, one killed by a signal is the cause of
        // the others' failing (they saw it leave).
        ended.sort_by_key(|(r, status)| (status.signal().is_none(), *r));
        if let Some(&first) = ended.iter().find(|(_, status)| !status.success()).filter(|_| failed.is_none()) {
            failed = Some(first);
            deadline = Some(Instant::now() + GRACE);
        }
        let s = signal.swap(0, Ordering::Relaxed);
        if s != 0 {
            passed = s;
            stop_all(&mut ranks, s as i32);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stop_all(&mut ranks, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failed {
        None => Ok(()),
        Some(_) if passed != 0 => Err(Failure {
            code: (128 + passed).min(255) as u8,
            message: format!("stopped by signal {passed}, passed on to every rank (rank 0 says how to resume)"),
        }),
        Some((r, status)) => {
            let how = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => "failed".into(),
            };
            let code = if status.code() == Some(2) { 2 } else { 1 };
            let message = format!("rank {r} of {n} stopped ({how}); the job was stopped (see the ranks' errors above)");
            Err(Failure { code, message })
        }
    }
}

/// Whether `n` ranks, one per GPU, fit the `gpus` the driver sees (or why it sees none): more
/// ranks than GPUs is an error, and so is no GPU unless `auto` (which then runs on the CPU).
fn enough_gpus(n: usize, gpus: densenet::Result<usize>, auto: bool) -> Result<(), Failure> {
    match gpus {
        Ok(gpus) if gpus > 0 && n > gpus => {
            Err(failure(format!("--nproc {n} starts one rank per GPU, and {gpus} GPU(s) are visible")))
        }
        Ok(0) if !auto => Err(failure("--nproc on --device cuda: the driver sees no GPU (use --device cpu or host)")),
        Err(e) if !auto => Err(e.into()),
        _ => Ok(()),
    }
}

/// Sends `signal` to every rank still running.
fn stop_all(ranks: &mut [Option<Child>], signal: i32) {
    for child in ranks.iter().flatten() {
        // SAFETY: kill(2) on a child's pid, which is not reaped before its slot is cleared.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    }
}

#[cfg(test)]
mod tests {
    use super::enough_gpus;

    #[test]
    fn nproc_needs_a_gpu_per_rank() {
        let message = |r: Result<(), crate::commands::Failure>| r.err().map(|f| f.message);
        assert_eq!(message(enough_gpus(2, Ok(2), false)), None);
        assert_eq!(
            message(enough_gpus(3, Ok(2), true)).as_deref(),
            Some("--nproc 3 starts one rank per GPU, and 2 GPU(s) are visible")
        );
        assert!(message(enough_gpus(2, Ok(0), false)).is_some_and(|m| m.contains("sees no GPU")));
        // auto without a GPU: the ranks run on the CPU.
        assert_eq!(message(enough_gpus(2, Ok(0), true)), None);
        assert_eq!(message(enough_gpus(2, Err(densenet::Error("no driver".into())), true)), None);
        assert_eq!(
            message(enough_gpus(2, Err(densenet::Error("no driver".into())), false)).as_deref(),
            Some("no driver")
        );
    }
}
