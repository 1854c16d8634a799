//! Data-parallel training's vocabulary and the host device's communicator (docs/launch.md):
//! a job of `world` ranks, each training a disjoint shard of every global batch and agreeing
//! on every step through collectives with NCCL's semantics (all-reduce, all-gather, broadcast,
//! issued by every rank in the same order).
//!
//! - [`rendezvous`]: the start-up handshake (rank 0 listens, the others connect);
//! - [`host`]: the collectives of the CPU and the host device over those connections, so the
//!   whole data-parallel path runs in CI as a GPU run would.

pub mod host;
pub mod rendezvous;

use crate::named::{by_name, Named};
use std::ops::Range;
use std::time::Duration;

/// Which rank of how many this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    /// This rank, below `world`.
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
}

impl Group {
    /// A process alone: rank 0 of 1.
    pub const SOLO: Group = Group { rank: 0, world: 1 };
}

/// The images of a global batch of `batch` that rank `rank` of `world` takes: the batch cut in
/// `world` consecutive shards, the first `batch % world` one image longer. Every rank computes
/// every rank's shard the same way (the CUDA kernel `bn_stats_combine` too).
pub fn shard(batch: usize, world: usize, rank: usize) -> Range<usize> {
    let (per, extra) = (batch / world, batch % world);
    let first = rank * per + rank.min(extra);
    first..first + per + (rank < extra) as usize
}

/// How batch norm treats a data-parallel job's shards (`--bn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BnMode {
    /// Statistics and their backward sums over the global batch (all-reduced): N ranks of B/N
    /// images take the single-device step on B images, up to reduction order.
    #[default]
    Sync,
    /// Each rank's statistics over its own shard (PyTorch DDP); rank 0's running statistics
    /// are the ones evaluated and saved.
    Local,
}

impl Named for BnMode {
    const WHAT: &'static str = "batch-norm mode";
    const VALUES: &'static [BnMode] = &[BnMode::Sync, BnMode::Local];

    fn name(self) -> &'static str {
        match self {
            BnMode::Sync => "sync",
            BnMode::Local => "local",
        }
    }
}
by_name!(BnMode, serde);

/// How long a rank waits for the others, at the rendezvous and in every collective, before it
/// gives up with an error naming what it waited for (the watchdog; `train --timeout`'s
/// default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cut_a_batch_into_consecutive_parts_that_differ_by_at_most_one() {
        for batch in 1..40 {
            for world in 1..=batch.min(9) {
                let parts: Vec<_> = (0..world).map(|r| shard(batch, world, r)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[world - 1].end, batch);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() == w[1].len() || w[0].len() == w[1].len() + 1, "{batch}/{world}: {parts:?}");
                }
                assert!(parts.iter().all(|p| !p.is_empty()));
            }
        }
        assert_eq!(shard(10, 3, 0), 0..4);
        assert_eq!(shard(10, 3, 2), 7..10);
    }
}
