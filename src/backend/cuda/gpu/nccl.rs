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
//! The watchdog: a thread that, while the executor waits for its stream with collectives
//! queued, aborts the communicator when the wait outlasts the timeout or NCCL reports an
//! error (a rank gone), so that the wait ends and the rank stops with the watchdog's reason
//! instead of hanging.

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
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> c_int,
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
        comm_destroy: bind!("ncclCommDestroy"),
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
    pub(super) fn library(&self) -> Library {
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

/// What the watchdog watches, under one lock.
#[derive(Default)]
struct Watch {
    /// When the executor began waiting on its stream, with collectives queued.
    waiting: Option<Instant>,
    /// The last collective queued, for messages.
    last: String,
    /// Why the watchdog aborted the communicator (then it is gone).
    aborted: Option<String>,
    /// Whether the executor is closing (the watchdog ends).
    closing: bool,
    /// Collectives queued since the stream was last waited for.
    queued: usize,
    /// Collectives queued in all, for messages.
    issued: u64,
}

/// A rank's NCCL communicator and its watchdog.
pub(super) struct Nccl {
    api: &'static Api,
    comm: Handle,
    group: Group,
    watch: Arc<Mutex<Watch>>,
    watchdog: Option<JoinHandle<()>>,
}

impl Nccl {
    /// Joins the job of `links` on the current GPU (the caller bound its context): rank 0's
    /// unique id is shared over the connections, then every rank creates its communicator.
    pub(super) fn join(api: &'static Api, mut links: Links) -> Result<Nccl> {
        let group = links.group;
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
        let what = format!("ncclCommInitRank (rank {} of {})", group.rank, group.world);
        // SAFETY: writes the communicator; blocks until every rank has called it.
        api.check(unsafe { (api.comm_init_rank)(&mut comm, group.world as c_int, id, group.rank as c_int) }, &what)?;
        let (watch, handle) = (Arc::new(Mutex::new(Watch::default())), Handle(comm));
        let watchdog = {
            let watch = watch.clone();
            std::thread::spawn(move || watchdog(api, handle, &watch, links.timeout))
        };
        Ok(Nccl { api, comm: handle, group, watch, watchdog: Some(watchdog) })
    }

    /// The job.
    pub(super) fn group(&self) -> Group {
        self.group
    }

    /// Queues `op` on `stream`, the arena at device address `base`.
    pub(super) fn issue(&self, op: Collective, base: u64, stream: cudaStream_t) -> Result<()> {
        let mut watch = self.lock();
        if let Some(why) = &watch.aborted {
            bail!("{why}");
        }
        let ptr = |s: crate::backend::Span| (base + s.off as u64) as *mut c_void;
        let (f32s, api, comm) = (ncclDataType_t::ncclFloat32, self.api, self.comm.0);
        watch.issued += 1;
        let (status, what) = match op {
            Collective::AllReduce { src, dst } => (
                // SAFETY: both spans are inside the arena (checked by the backend), on this GPU.
                unsafe { (api.all_reduce)(ptr(src), ptr(dst), src.len, f32s, ncclRedOp_t::ncclSum, comm, stream) },
                format!("all-reduce of {} values", src.len),
            ),
            Collective::AllGather { src, dst } => (
                // SAFETY: as above; `dst` holds `world` times `src`.
                unsafe { (api.all_gather)(ptr(src), ptr(dst), src.len, f32s, comm, stream) },
                format!("all-gather of {} values", dst.len),
            ),
            Collective::Broadcast(s) => (
                // SAFETY: as above, in place from rank 0.
                unsafe { (api.broadcast)(ptr(s), ptr(s), s.len, f32s, 0, comm, stream) },
                format!("broadcast of {} values", s.len),
            ),
        };
        let what = format!("collective {} ({what})", watch.issued);
        watch.queued += 1;
        watch.last = what.clone();
        api.check(status, &what)
    }

    /// Runs `wait` (a wait for the stream) under the watchdog when collectives are queued; the
    /// watchdog's reason when it aborted the communicator meanwhile.
    pub(super) fn watched<T>(&self, wait: impl FnOnce() -> Result<T>) -> Result<T> {
        {
            let mut watch = self.lock();
            if watch.queued > 0 {
                watch.waiting = Some(Instant::now());
            }
        }
        let r = wait();
        let mut watch = self.lock();
        watch.waiting = None;
        if let Some(why) = &watch.aborted {
            bail!("{why}");
        }
        if r.is_ok() {
            watch.queued = 0;
        }
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every 100 ms: a queued collective waited for longer than `timeout`, or an error NCCL reports
/// (a rank gone), aborts the communicator with the reason.
fn watchdog(api: &'static Api, comm: Handle, watch: &Mutex<Watch>, timeout: Duration) {
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let mut w = watch.lock().unwrap_or_else(|p| p.into_inner());
        if w.closing {
            return;
        }
        let mut status = SUCCESS;
        // SAFETY: polls the communicator, which stays alive until `closing` is set under this lock.
        let polled = unsafe { (api.comm_get_async_error)(comm.0, &mut status) };
        let why = if polled == SUCCESS && status != SUCCESS && status != IN_PROGRESS {
            api.check(status, &format!("NCCL, after {}", w.last))
                .err()
                .map(|e| format!("{e} (did a rank leave the job?)"))
        } else if w.waiting.is_some_and(|t| t.elapsed() > timeout) {
            Some(format!(
                "{} did not finish within {} s: a rank did not take part (the watchdog's timeout, --timeout)",
                w.last,
                timeout.as_secs()
            ))
        } else {
            None
        };
        if let Some(why) = why {
            // SAFETY: aborts the communicator, ending the work queued on it; it is not used again.
            unsafe { (api.comm_abort)(comm.0) };
            w.aborted = Some(why);
            return;
        }
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
            // SAFETY: the communicator is alive (not aborted) and no longer used.
            unsafe { (self.api.comm_destroy)(self.comm.0) };
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
            Ok(api) => assert!(api.library().version.contains('.')),
            Err(e) => {
                assert!(e.0.starts_with("NCCL not found (libnccl.so.2): "), "{e}");
                assert!(e.0.contains("pip install nvidia-nccl-cu13") && !e.0.contains('\n'), "{e}");
            }
        }
    }
}
