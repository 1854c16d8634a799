//! NCCL for a data-parallel job on GPUs (docs/launch.md), loaded at run time like the other
//! CUDA libraries: `libnccl.so.2` (the name NCCL's packages install) or `libnccl.so`. Only a job
//! needs it; its absence is a one-line error saying how to install it. cudarc's `nccl` module
//! gives the types; the functions are bound here from the library found, since cudarc looks for
//! other names.
//!
//! Rank 0 makes NCCL's unique id and sends it over the rendezvous's connections; every rank
//! then joins the communicator on its GPU. The collectives go on the executor's one stream, in
//! the order the model issues them, the same on every rank.
//!
//! The watchdog: a thread that aborts the communicator when collectives queued have not been
//! seen to finish within the timeout, or NCCL reports an error (a rank gone), so that whatever
//! the executor waits in ends and the rank stops with the watchdog's reason instead of
//! hanging. A rank stuck inside a call into NCCL, where the communicator cannot be freed under
//! it, ends its process with the reason (as PyTorch's watchdog does); so does one whose
//! communicator is not created within the timeout.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};

use crate::backend::{Collective, Library};
use crate::comm::rendezvous::Links;
use crate::comm::Group;
use crate::{bail, Error, Result};

/// `ncclSuccess` and `ncclInProgress` of `ncclResult_t` (read as an int: NCCL may add values).
const SUCCESS: c_int = 0;
const IN_PROGRESS: c_int = 7;

/// The functions used, from the library found.
pub(super) struct Api {
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        cudaStream_t,
    ) -> c_int,
    all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, cudaStream_t) -> c_int,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        c_int,
        ncclComm_t,
        cudaStream_t,
    ) -> c_int,
    /// The file it was loaded from, for reports.
    file: &'static str,
}

/// The names NCCL is looked for under, in order.
const FILES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// NCCL, loaded once; the error when it cannot be.
pub(super) fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(|e| Error(e.clone()))
}

fn load() -> std::result::Result<Api, String> {
    static LIB: OnceLock<(libloading::Library, &'static str)> = OnceLock::new();
    let (lib, file) = match LIB.get() {
        Some(l) => l,
        None => {
            // SAFETY: loads NVIDIA's NCCL, whose initialisers are sound; kept loaded for the
            // life of the process (the function pointers below point into it).
            let found = FILES.iter().find_map(|&f| unsafe { libloading::Library::new(f) }.ok().map(|l| (l, f)));
            let Some(found) = found else {
                return Err(format!(
                    "NCCL not found ({}): a job of several GPUs needs it: pip install nvidia-nccl-cu13 and add its \
                     nvidia/nccl/lib folder to LD_LIBRARY_PATH (a single GPU does not need it)",
                    FILES[0]
                ));
            };
            LIB.get_or_init(|| found)
        }
    };
    macro_rules! bind {
        ($name:literal) => {
            // SAFETY: the symbol is NCCL's function of that name, whose C signature the field's
            // type declares (nccl.h, NCCL 2.x); the library stays loaded.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{file} has no {} ({e}): install NCCL 2", $name))?
        };
    }
    Ok(Api {
        get_version: bind!("ncclGetVersion"),
        get_unique_id: bind!("ncclGetUniqueId"),
        comm_init_rank: bind!("ncclCommInitRank"),
        comm_abort: bind!("ncclCommAbort"),
        comm_get_async_error: bind!("ncclCommGetAsyncError"),
        get_error_string: bind!("ncclGetErrorString"),
        all_reduce: bind!("ncclAllReduce"),
        all_gather: bind!("ncclAllGather"),
        broadcast: bind!("ncclBroadcast"),
        file,
    })
}

impl Api {
    /// `ok`, or the error of `what` with NCCL's text for `status`.
    fn check(&self, status: c_int, what: &str) -> Result<()> {
        if status == SUCCESS {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for any result value.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(status)) }.to_string_lossy();
        bail!("{what} failed: NCCL error {status} ({text})")
    }

    /// NCCL's version, for reports.
    pub(super) fn loaded(&self) -> Library {
        let mut v = 0;
        // SAFETY: writes one int.
        let version = match unsafe { (self.get_version)(&mut v) } {
            SUCCESS => format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100),
            _ => "unknown".into(),
        };
        Library::loaded("nccl", version, None, self.file.trim_end_matches(".2"))
    }
}

/// The communicator handle, shared with the watchdog (NCCL allows aborting a communicator from
/// another thread while one waits on its work).
#[derive(Clone, Copy)]
struct Handle(ncclComm_t);
// SAFETY: NCCL communicators may be used from several threads as the watchdog does: it only
// polls the asynchronous error and aborts, both documented as callable while operations run.
unsafe impl Send for Handle {}

/// What the watchdog watches, under one lock (never held across a call into NCCL or CUDA).
#[derive(Default)]
struct Watch {
    /// Since when collectives have been queued that no finished wait for the stream covers.
    pending: Option<Instant>,
    /// Since when the executor has been inside a call into NCCL (queueing a collective).
    calling: Option<Instant>,
    /// The last collective queued, for messages.
    last: String,
    /// Collectives queued in all, for messages.
    issued: u64,
    /// Why the watchdog aborted the communicator (then it is gone).
    aborted: Option<String>,
    /// Whether the executor is closing (the watchdog ends).
    closing: bool,
}

/// A rank's NCCL communicator and its watchdog.
pub(super) struct Nccl {
    api: &'static Api,
    comm: Handle,
    group: Group,
    watch: Arc<Mutex<Watch>>,
    watchdog: Option<JoinHandle<()>>,
}

/// Ends the process with `why` when `done` is not set within `timeout`: for a call into NCCL
/// that cannot be aborted (a communicator being created, or in use by the calling thread).
fn deadline(why: String, timeout: Duration) -> impl FnOnce() {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = done.clone();
    let start = Instant::now();
    let _ = std::thread::Builder::new().name("nccl deadline".into()).spawn(move || {
        while !watching.load(std::sync::atomic::Ordering::Relaxed) {
            if start.elapsed() > timeout {
                give_up(&why);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    move || done.store(true, std::sync::atomic::Ordering::Relaxed)
}

/// Ends the process with `why` (one line on stderr, exit status 1): a rank stuck inside NCCL
/// cannot return an error, and PyTorch's watchdog does the same.
fn give_up(why: &str) -> ! {
    eprintln!("error: {why}");
    std::process::exit(1)
}

impl Nccl {
    /// Joins the job of `links` on the current GPU (the caller bound its context): rank 0's
    /// unique id is shared over the connections, then every rank creates its communicator
    /// (within the timeout, or the process ends saying so).
    pub(super) fn join(api: &'static Api, mut links: Links) -> Result<Nccl> {
        let (group, timeout) = (links.group, links.timeout);
        let mut id = ncclUniqueId { internal: [0; 128] };
        let mut bytes = Vec::new();
        if group.rank == 0 {
            // SAFETY: writes one unique id.
            api.check(unsafe { (api.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
            bytes = id.internal.iter().map(|&c| c as u8).collect();
        }
        links.share(&mut bytes)?;
        if bytes.len() != id.internal.len() {
            bail!("rank 0 sent an NCCL id of {} bytes, not {}", bytes.len(), id.internal.len());
        }
        id.internal.iter_mut().zip(&bytes).for_each(|(c, &b)| *c = b as c_char);
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let what = format!("rank {}: ncclCommInitRank (rank {} of {})", group.rank, group.rank, group.world);
        let done = deadline(format!("{what} did not finish within {} s (--timeout)", timeout.as_secs()), timeout);
        // SAFETY: writes the communicator; blocks until every rank has called it.
        let status = unsafe { (api.comm_init_rank)(&mut comm, group.world as c_int, id, group.rank as c_int) };
        done();
        let created = match status {
            IN_PROGRESS => Err(Error(format!("{what}: NCCL_COMM_BLOCKING=0 is not supported: unset it"))),
            _ => api.check(status, &what),
        };
        if let Err(e) = created {
            if !comm.is_null() {
                // SAFETY: frees the communicator NCCL allocated before its creation failed.
                unsafe { (api.comm_abort)(comm) };
            }
            return Err(e);
        }
        let (watch, handle) = (Arc::new(Mutex::new(Watch::default())), Handle(comm));
        let watching = watch.clone();
        let spawned = std::thread::Builder::new()
            .name("nccl watchdog".into())
            .spawn(move || watchdog(api, handle, &watching, timeout));
        match spawned {
            Ok(watchdog) => Ok(Nccl { api, comm: handle, group, watch, watchdog: Some(watchdog) }),
            Err(e) => {
                // SAFETY: the communicator was just created and is not used again.
                unsafe { (api.comm_abort)(comm) };
                bail!("cannot start NCCL's watchdog: {e}")
            }
        }
    }

    /// The job.
    pub(super) fn group(&self) -> Group {
        self.group
    }

    /// Queues `op` on `stream`, the arena at device address `base`; `op`'s spans are checked
    /// by the caller ([`Collective::check`], inside the arena).
    pub(super) fn issue(&self, op: Collective, base: u64, stream: cudaStream_t) -> Result<()> {
        let ptr = |s: crate::backend::Span| (base + s.off as u64) as *mut c_void;
        let (f32s, api, comm) = (ncclDataType_t::ncclFloat32, self.api, self.comm.0);
        let what = match op {
            Collective::AllReduce { src, .. } => format!("all-reduce of {} values", src.len),
            Collective::AllGather { dst, .. } => format!("all-gather of {} values", dst.len),
            Collective::Broadcast(s) => format!("broadcast of {} values", s.len),
        };
        let what = {
            let mut w = self.lock();
            if let Some(why) = &w.aborted {
                bail!("{why}");
            }
            w.issued += 1;
            w.last = format!("collective {} ({what})", w.issued);
            let now = Instant::now();
            w.calling = Some(now);
            w.pending.get_or_insert(now);
            w.last.clone()
        };
        // SAFETY: the spans are f32 and inside the arena, on this GPU (checked by the caller);
        // all-gather's `dst` holds `world` times `src`; broadcast is in place from rank 0. The
        // watchdog does not abort the communicator while `calling` is set.
        let status = unsafe {
            match op {
                Collective::AllReduce { src, dst } => {
                    (api.all_reduce)(ptr(src), ptr(dst), src.len, f32s, ncclRedOp_t::ncclSum, comm, stream)
                }
                Collective::AllGather { src, dst } => (api.all_gather)(ptr(src), ptr(dst), src.len, f32s, comm, stream),
                Collective::Broadcast(s) => (api.broadcast)(ptr(s), ptr(s), s.len, f32s, 0, comm, stream),
            }
        };
        self.lock().calling = None;
        api.check(status, &what)
    }

    /// Runs `wait` (a wait for the stream); the watchdog's reason when it aborted the
    /// communicator meanwhile. A finished wait covers every collective queued before it.
    pub(super) fn watched<T>(&self, wait: impl FnOnce() -> Result<T>) -> Result<T> {
        let r = wait();
        let mut w = self.lock();
        if let Some(why) = &w.aborted {
            bail!("{why}");
        }
        if r.is_ok() {
            w.pending = None;
        }
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every 100 ms: collectives queued longer than `timeout` ago that no wait has seen finish, or
/// an error NCCL reports (a rank gone), abort the communicator with the reason, which the
/// executor's next collective or wait returns; the queued work then ends, whatever the
/// executor's thread is waiting in (the stream, a kernel launch). While that thread is inside
/// a call into NCCL the communicator cannot be freed under it: the process ends instead.
fn watchdog(api: &'static Api, comm: Handle, watch: &Mutex<Watch>, timeout: Duration) {
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let mut w = watch.lock().unwrap_or_else(|p| p.into_inner());
        if w.closing {
            return;
        }
        let mut status = SUCCESS;
        // SAFETY: polls the communicator (atomic loads only), which stays alive until
        // `closing` is set under this lock.
        let polled = unsafe { (api.comm_get_async_error)(comm.0, &mut status) };
        let why = if polled == SUCCESS && status != SUCCESS && status != IN_PROGRESS {
            api.check(status, &format!("NCCL, after {}", w.last))
                .err()
                .map(|e| format!("{e} (did a rank leave the job?)"))
        } else if w.pending.is_some_and(|t| t.elapsed() > timeout) {
            Some(format!(
                "{} did not finish within {} s: a rank did not take part (the watchdog's timeout, --timeout)",
                w.last,
                timeout.as_secs()
            ))
        } else {
            None
        };
        let Some(why) = why else { continue };
        if w.calling.is_some() {
            give_up(&why);
        }
        // SAFETY: aborts the communicator, ending the work queued on it; the executor's thread
        // is not inside NCCL (`calling` is clear under this lock) and sees `aborted` before any
        // further use.
        unsafe { (api.comm_abort)(comm.0) };
        w.aborted = Some(why);
        return;
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        let aborted = {
            let mut w = self.lock();
            w.closing = true;
            w.aborted.is_some()
        };
        if let Some(t) = self.watchdog.take() {
            let _ = t.join();
        }
        if !aborted {
            // SAFETY: the communicator is alive and no longer used. Abort, not destroy: after
            // a finished wait it is the same, and after a failed one it cannot block on work
            // that never ends.
            unsafe { (self.api.comm_abort)(self.comm.0) };
        }
    }
}

#[cfg(test)]
mod tests {
    /// Without NCCL (this machine has none unless it is installed), joining says how to get it
    /// in one line; with it, the functions bind.
    #[test]
    fn nccl_loads_or_says_how_to_install_it() {
        match super::api() {
            Ok(api) => assert!(api.loaded().version.contains('.')),
            Err(e) => {
                assert!(e.0.starts_with("NCCL not found (libnccl.so.2): "), "{e}");
                assert!(e.0.contains("pip install nvidia-nccl-cu13") && !e.0.contains('\n'), "{e}");
            }
        }
    }
}
