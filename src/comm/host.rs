//! The collectives of the CPU and the host device, between processes (or threads) joined by a
//! [`rendezvous`](super::rendezvous): NCCL's semantics, on host `f32` values, through rank 0
//! (every other rank sends to it and it answers each), so results are the same on every rank
//! and sums are taken in rank order. A read or write that waits longer than the timeout is the
//! watchdog's error; a rank that leaves (its connection closes) stops the others with an error
//! naming it, which rank 0 forwards to every rank still waiting. After an error every later
//! collective fails at once with it, so no rank blocks on a job that has stopped.

use super::rendezvous::{patience, receive_head, send, Kind, Links};
use super::Group;
use crate::{Error, Result};
use std::io::{ErrorKind, Read};
use std::net::TcpStream;

/// One rank's end of the host collectives.
pub struct HostComm {
    links: Links,
    /// Collectives issued so far, for messages.
    issued: u64,
    /// The error that stopped the job, returned by every later collective.
    failed: Option<Error>,
}

/// Which collective, for messages.
#[derive(Clone, Copy)]
enum Op {
    AllReduce,
    AllGather,
    Broadcast,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all-reduce",
            Op::AllGather => "all-gather",
            Op::Broadcast => "broadcast",
        }
    }
}

impl HostComm {
    /// The collectives over a rendezvous's connections.
    pub fn new(links: Links) -> HostComm {
        HostComm { links, issued: 0, failed: None }
    }

    /// This rank and the job's size.
    pub fn group(&self) -> Group {
        self.links.group
    }

    /// `data` = the element-wise sum of every rank's `data` (the same length on every rank).
    pub fn all_reduce(&mut self, data: &mut [f32]) -> Result<()> {
        self.run(Op::AllReduce, data.len(), |c, what| {
            if c.links.group.rank != 0 {
                c.send_to(0, Kind::Data, bytemuck::cast_slice(data), what)?;
                return c.receive_into(0, bytemuck::cast_slice_mut(data), what);
            }
            let mut part = vec![0f32; data.len()];
            for r in 1..c.links.group.world {
                c.receive_into(r, bytemuck::cast_slice_mut(&mut part), what)?;
                data.iter_mut().zip(&part).for_each(|(d, p)| *d += p);
            }
            c.answer_all(bytemuck::cast_slice(data), what)
        })
    }

    /// `out` = every rank's `part`, in rank order (`out` is `world` times as long).
    pub fn all_gather(&mut self, part: &[f32], out: &mut [f32]) -> Result<()> {
        assert_eq!(out.len(), part.len() * self.links.group.world, "all-gather into a buffer of the wrong length");
        self.run(Op::AllGather, out.len(), |c, what| {
            if c.links.group.rank != 0 {
                c.send_to(0, Kind::Data, bytemuck::cast_slice(part), what)?;
                return c.receive_into(0, bytemuck::cast_slice_mut(out), what);
            }
            let mut chunks = out.chunks_mut(part.len());
            chunks.next().expect("rank 0's part").copy_from_slice(part);
            for (r, chunk) in chunks.enumerate() {
                c.receive_into(r + 1, bytemuck::cast_slice_mut(chunk), what)?;
            }
            c.answer_all(bytemuck::cast_slice(out), what)
        })
    }

    /// `data` = rank 0's `data`.
    pub fn broadcast(&mut self, data: &mut [f32]) -> Result<()> {
        self.run(Op::Broadcast, data.len(), |c, what| match c.links.group.rank {
            0 => c.answer_all(bytemuck::cast_slice(data), what),
            _ => c.receive_into(0, bytemuck::cast_slice_mut(data), what),
        })
    }

    /// Runs collective `op` of `len` floats by `body`, unless the job has stopped; on an error
    /// rank 0 tells every other rank why, and the error stays.
    fn run(&mut self, op: Op, len: usize, body: impl FnOnce(&mut Self, &str) -> Result<()>) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.issued += 1;
        let what = format!("collective {} ({} of {len} values)", self.issued, op.name());
        if let Err(e) = body(self, &what) {
            if self.links.group.rank == 0 {
                for p in &mut self.links.peers {
                    let _ = send(p, Kind::Abort, e.0.as_bytes());
                }
            }
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    /// The connection to rank `r` (rank 0's to rank r, or another rank's to rank 0).
    fn peer(&mut self, r: usize) -> &mut TcpStream {
        let i = if self.links.group.rank == 0 { r - 1 } else { 0 };
        &mut self.links.peers[i]
    }

    /// This rank and how long it waits for a peer: the watchdog's timeout on rank 0,
    /// [`patience`] on the others.
    fn waits(&self) -> (usize, std::time::Duration) {
        match self.links.group.rank {
            0 => (0, self.links.timeout),
            r => (r, patience(self.links.timeout)),
        }
    }

    fn send_to(&mut self, r: usize, kind: Kind, bytes: &[u8], what: &str) -> Result<()> {
        let (rank, timeout) = self.waits();
        send(self.peer(r), kind, bytes).map_err(|e| lost(rank, r, what, &e, timeout))
    }

    /// Rank 0 sends `bytes` to every other rank.
    fn answer_all(&mut self, bytes: &[u8], what: &str) -> Result<()> {
        (1..self.links.group.world).try_for_each(|r| self.send_to(r, Kind::Data, bytes, what))
    }

    /// Reads rank `r`'s next frame into `out`, which it must fill exactly; rank 0's abort
    /// becomes this rank's error.
    fn receive_into(&mut self, r: usize, out: &mut [u8], what: &str) -> Result<()> {
        let (rank, timeout) = self.waits();
        let peer = self.peer(r);
        let (kind, len) = receive_head(peer).map_err(|e| lost(rank, r, what, &e, timeout))?;
        if kind == Kind::Abort {
            let mut why = vec![0; len.min(1 << 16)];
            let _ = peer.read_exact(&mut why);
            return Err(Error(format!("the job stopped: {}", String::from_utf8_lossy(&why))));
        }
        if len != out.len() {
            return Err(Error(format!(
                "rank {r} sent {len} bytes for {what}, which takes {}: the ranks issue different collectives \
                 (do they run the same command?)",
                out.len()
            )));
        }
        peer.read_exact(out).map_err(|e| lost(rank, r, what, &e, timeout))
    }
}

/// The error of rank `rank` whose read or write with rank `r` failed in `what`: the watchdog's
/// timeout, or `r` gone.
fn lost(rank: usize, r: usize, what: &str, e: &std::io::Error, timeout: std::time::Duration) -> Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Error(format!(
            "rank {rank}: {what} did not finish within {} s: rank {r} did not take part (the watchdog's timeout, \
             --timeout)",
            timeout.as_secs()
        )),
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted => Error(format!("rank {r} left the job during {what} (see its own error)")),
        _ => Error(format!("rank {rank}: {what} with rank {r} failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::rendezvous::rendezvous;
    use std::time::{Duration, Instant};

    /// A port no one listens on now.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Runs `body` as every rank of a job of `world` threads; their results in rank order.
    fn job<T: Send>(world: usize, timeout: Duration, body: impl Fn(HostComm) -> T + Sync) -> Vec<Result<T>> {
        let port = free_port();
        std::thread::scope(|s| {
            let ranks: Vec<_> = (0..world)
                .map(|rank| {
                    let body = &body;
                    s.spawn(move || {
                        let links = rendezvous(Group { rank, world }, "127.0.0.1", port, timeout)?;
                        Ok(body(HostComm::new(links)))
                    })
                })
                .collect();
            ranks.into_iter().map(|t| t.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_give_every_rank_the_same_result() {
        let results = job(3, Duration::from_secs(20), |mut c| {
            let r = c.group().rank as f32;
            let mut sum = vec![r, 10.0 * r + 1.0];
            c.all_reduce(&mut sum).unwrap();
            let mut all = vec![0.0; 6];
            c.all_gather(&[r, -r], &mut all).unwrap();
            let mut b = vec![r + 7.0; 3];
            c.broadcast(&mut b).unwrap();
            (sum, all, b)
        });
        for r in results {
            let (sum, all, b) = r.unwrap();
            assert_eq!(sum, [3.0, 33.0]);
            assert_eq!(all, [0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
            assert_eq!(b, [7.0; 3]);
        }
    }

    #[test]
    fn a_rank_that_does_not_take_part_trips_the_watchdog_and_one_that_leaves_is_named() {
        let results = job(3, Duration::from_secs(1), |mut c| match c.group().rank {
            // Rank 1 never comes to the collective, and rank 2 leaves once it has.
            1 => {
                std::thread::sleep(Duration::from_millis(2500));
                Ok(())
            }
            0 => {
                let start = Instant::now();
                let e = c.all_reduce(&mut [1.0]).unwrap_err();
                assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
                // Later collectives fail at once with the same error.
                assert_eq!(c.broadcast(&mut [0.0]).unwrap_err(), e);
                Err(e)
            }
            _ => c.all_reduce(&mut [1.0]),
        });
        let e0 = results[0].as_ref().unwrap().as_ref().unwrap_err().0.clone();
        assert!(e0.contains("rank 0: collective 1 (all-reduce of 1 values) did not finish within 1 s: rank 1"), "{e0}");
        // Rank 2 was waiting for rank 0's answer and got its reason.
        let e2 = results[2].as_ref().unwrap().as_ref().unwrap_err().0.clone();
        assert_eq!(e2, format!("the job stopped: {e0}"));

        let results = job(2, Duration::from_secs(20), |mut c| match c.group().rank {
            0 => c.all_reduce(&mut [1.0]),
            _ => Ok(()),
        });
        let e = results[0].as_ref().unwrap().as_ref().unwrap_err();
        assert_eq!(e.0, "rank 1 left the job during collective 1 (all-reduce of 1 values) (see its own error)");
    }

    #[test]
    fn a_rank_that_cannot_reach_rank_0_says_so() {
        let e = rendezvous(Group { rank: 1, world: 2 }, "127.0.0.1", free_port(), Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(e.0.starts_with("rank 1 could not reach rank 0 at 127.0.0.1:"), "{e}");
        let e = rendezvous(Group { rank: 0, world: 3 }, "", free_port(), Duration::from_millis(200)).err().unwrap();
        assert!(e.0.contains("rank(s) 1, 2 of 3 did not come"), "{e}");
    }
}
