//! The start-up handshake of a job: rank 0 listens on a port of its host, every other rank
//! connects to it and says which rank of how many it is, and rank 0 answers each once all have
//! come (a barrier). The connections then carry the host device's collectives ([`super::host`])
//! or, on GPUs, only NCCL's unique id; this is the one networking the project writes.
//!
//! Every message is a frame: a kind byte, a little-endian `u64` length and that many bytes.

use super::Group;
use crate::{bail, Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// A rank's first words: the protocol's magic, its rank and the job's size.
const HELLO: &[u8; 4] = b"DNR1";

/// What a frame holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Payload bytes.
    Data = 0,
    /// The job stops: the payload is rank 0's one-line reason.
    Abort = 1,
}

/// A rank's connections once the rendezvous is done: rank 0 holds one per other rank (rank
/// `r` at `r - 1`), every other rank one, to rank 0.
pub struct Links {
    /// This rank and the job's size.
    pub group: Group,
    /// The connections.
    pub(crate) peers: Vec<TcpStream>,
    /// How long a read or write may wait.
    pub timeout: Duration,
}

impl Links {
    /// Another handle on the same connections, to [`Links::share`] on before the collectives
    /// start (rank 0's convolution algorithms) while the backend holds these.
    pub fn try_clone(&self) -> Result<Links> {
        let peers = self.peers.iter().map(TcpStream::try_clone).collect::<std::io::Result<_>>();
        let peers = peers.map_err(|e| Error(format!("cannot share the connections between ranks: {e}")))?;
        Ok(Links { group: self.group, peers, timeout: self.timeout })
    }

    /// Rank 0's `data` on every rank, sent over the connections (NCCL's unique id, rank 0's
    /// convolution algorithms).
    pub fn share(&mut self, data: &mut Vec<u8>) -> Result<()> {
        if self.group.rank == 0 {
            for (r, p) in self.peers.iter_mut().enumerate() {
                send(p, Kind::Data, data)
                    .map_err(|e| Error(format!("rank {} left during the start-up: {e}", r + 1)))?;
            }
            return Ok(());
        }
        let (kind, payload) =
            receive(&mut self.peers[0]).map_err(|e| Error(format!("rank 0 left during the start-up: {e}")))?;
        if kind == Kind::Abort {
            bail!("the job stopped: {}", String::from_utf8_lossy(&payload));
        }
        *data = payload;
        Ok(())
    }
}

/// Meets the other ranks of `group`: rank 0 listens on `port` of every interface of its host,
/// the others connect to `host:port`, retrying until `timeout` has passed. An error says which
/// ranks did not come, or that rank 0 could not be reached.
pub fn rendezvous(group: Group, host: &str, port: u16, timeout: Duration) -> Result<Links> {
    let deadline = Instant::now() + timeout;
    let peers = match group.rank {
        0 => accept_all(group, port, timeout, deadline)?,
        _ => vec![connect(group, host, port, timeout, deadline)?],
    };
    Ok(Links { group, peers, timeout })
}

/// Rank 0's side: every other rank's hello, then an empty answer to each.
fn accept_all(group: Group, port: u16, timeout: Duration, deadline: Instant) -> Result<Vec<TcpStream>> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| Error(format!("rank 0 cannot listen on port {port}: {e} (is another job using it?)")))?;
    listener.set_nonblocking(true).map_err(|e| Error(format!("rank 0 cannot listen on port {port}: {e}")))?;
    let mut peers: Vec<Option<TcpStream>> = (1..group.world).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        let (mut stream, from) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> =
                        (1..group.world).filter(|&r| peers[r - 1].is_none()).map(|r| r.to_string()).collect();
                    bail!(
                        "rank 0 waited {} s on port {port} and rank(s) {} of {} did not come (did they start? \
                         do they use the same address and port?)",
                        timeout.as_secs(),
                        missing.join(", "),
                        group.world
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => bail!("rank 0 could not accept a connection on port {port}: {e}"),
        };
        configure(&stream, timeout)?;
        let mut hello = [0u8; 12];
        if stream.read_exact(&mut hello).is_err() || &hello[..4] != HELLO {
            log::warn!("rank 0 ignored a connection from {from} that is not a rank of this job");
            continue;
        }
        let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes")) as usize;
        let (rank, world) = (word(4), word(8));
        let refuse = if world != group.world {
            Some(format!("a rank of a job of {world} ranks came to rank 0 of {}", group.world))
        } else if rank == 0 || rank >= world {
            Some(format!("rank {rank} is not a rank of a job of {world}"))
        } else if peers[rank - 1].is_some() {
            Some(format!("rank {rank} came twice"))
        } else {
            None
        };
        if let Some(why) = refuse {
            let _ = send(&mut stream, Kind::Abort, why.as_bytes());
            bail!("{why} (from {from})");
        }
        peers[rank - 1] = Some(stream);
    }
    let mut peers: Vec<TcpStream> = peers.into_iter().map(|p| p.expect("every rank came")).collect();
    for (r, p) in peers.iter_mut().enumerate() {
        send(p, Kind::Data, &[]).map_err(|e| Error(format!("rank {} left during the rendezvous: {e}", r + 1)))?;
    }
    Ok(peers)
}

/// Another rank's side: connect (retrying until the deadline), say hello, wait for rank 0's
/// answer.
fn connect(group: Group, host: &str, port: u16, timeout: Duration, deadline: Instant) -> Result<TcpStream> {
    let rank = group.rank;
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error(format!("rank {rank} cannot resolve rank 0's host '{host}': {e}")))?
        .collect();
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(s) =
            addrs.iter().find_map(|a| TcpStream::connect_timeout(a, left.max(Duration::from_millis(100))).ok())
        {
            break s;
        }
        if Instant::now() >= deadline {
            bail!(
                "rank {rank} could not reach rank 0 at {host}:{port} within {} s (check MASTER_ADDR and the port; \
                 did rank 0 start?)",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    configure(&stream, timeout)?;
    let mut hello = HELLO.to_vec();
    hello.extend((rank as u32).to_le_bytes());
    hello.extend((group.world as u32).to_le_bytes());
    let gone = |e: &dyn std::fmt::Display| {
        Error(format!("rank {rank} lost rank 0 at {host}:{port} during the rendezvous: {e}"))
    };
    stream.write_all(&hello).map_err(|e| gone(&e))?;
    // Rank 0 answers once every rank has come: wait for it until the deadline, not longer.
    stream
        .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))
        .map_err(|e| gone(&e))?;
    let (kind, why) = receive(&mut stream).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Error(format!(
            "rank {rank} reached rank 0 at {host}:{port}, but not every rank came within {} s",
            timeout.as_secs()
        )),
        _ => gone(&e),
    })?;
    if kind == Kind::Abort {
        bail!("rank 0 refused rank {rank}: {}", String::from_utf8_lossy(&why));
    }
    stream.set_read_timeout(Some(patience(timeout))).map_err(|e| gone(&e))?;
    Ok(stream)
}

/// How long a rank other than 0 waits for rank 0 in a collective: longer than the watchdog's
/// `timeout`, which rank 0 keeps for every rank and whose reason it sends to all, so that a
/// rank that did not take part is named by rank 0 rather than rank 0 by the others.
pub(crate) fn patience(timeout: Duration) -> Duration {
    2 * timeout + Duration::from_secs(5)
}

/// Blocking, with `timeout` on reads and writes, no Nagle delay (collectives are small).
fn configure(stream: &TcpStream, timeout: Duration) -> Result<()> {
    let set = || -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))
    };
    set().map_err(|e| Error(format!("cannot set up a connection between ranks: {e}")))
}

/// Writes one frame.
pub(crate) fn send(stream: &mut TcpStream, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&head)?;
    stream.write_all(payload)
}

/// Reads one frame's head: its kind and payload length.
pub(crate) fn receive_head(stream: &mut TcpStream) -> std::io::Result<(Kind, usize)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head)?;
    let kind = match head[0] {
        0 => Kind::Data,
        1 => Kind::Abort,
        k => return Err(std::io::Error::new(ErrorKind::InvalidData, format!("a frame of unknown kind {k}"))),
    };
    Ok((kind, u64::from_le_bytes(head[1..].try_into().expect("8 bytes")) as usize))
}

/// Reads one whole frame.
fn receive(stream: &mut TcpStream) -> std::io::Result<(Kind, Vec<u8>)> {
    let (kind, len) = receive_head(stream)?;
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload)?;
    Ok((kind, payload))
}
