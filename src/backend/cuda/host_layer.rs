//! Rust side of the host execution layer (`kernels/host/`, docs/host-layer.md): runs a
//! [`Launch`] of our CUDA C++ kernels, compiled for the CPU by `build/host.rs`, with every GPU
//! thread a fiber. Out-of-range indices, reads of unwritten or racing shared memory, divergent
//! barriers, misused warp collectives, bad launch configurations and launches past the time
//! limit are errors naming the kernel, block and thread.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::time::Duration;

use super::launch::{Arg, Launch};
use crate::{bail, Error, Result};

/// The launch configuration (`DnDims` in kernels/host/dn_rt.h).
#[repr(C)]
struct DnDims {
    grid: [u32; 3],
    block: [u32; 3],
    shared: u32,
    /// 0: `$DENSENET_HOST_TIMEOUT_S`, else 20 s.
    timeout_ms: u32,
}

/// One kernel argument (`DnArg` in kernels/host/dn_rt.h).
#[repr(C)]
struct DnArg {
    kind: u32,
    pad: u32,
    bits: u64,
    ptr: *mut c_void,
    len: usize,
}

/// A generated wrapper `dn_host_<kernel>`: 0, or nonzero with a message in the buffer.
type HostFn = unsafe extern "C" fn(*const DnDims, *const DnArg, usize, *mut c_char, usize) -> c_int;

include!(concat!(env!("OUT_DIR"), "/host_kernels.rs"));

/// Runs `l` on the host layer over the arena of `arena_len` bytes at `arena`, which must be
/// valid for reads and writes of that many bytes for the duration of the call.
pub(crate) fn launch(arena: *mut u8, arena_len: usize, l: &Launch) -> Result<()> {
    launch_with(arena, arena_len, l, None)
}

fn launch_with(arena: *mut u8, arena_len: usize, l: &Launch, timeout: Option<Duration>) -> Result<()> {
    let Some(&(_, kernel)) = KERNELS.iter().find(|(name, _)| *name == l.kernel) else {
        bail!("kernel `{}`: no such __global__ function in kernels/*.cu (host layer)", l.kernel)
    };
    let mut args = Vec::with_capacity(l.args.len());
    for (i, a) in l.args.iter().enumerate() {
        let (kind, bits) = match *a {
            Arg::Buf(s) => {
                let (off, len) = (s.off, s.len);
                if s.len.checked_mul(s.dtype.size()).and_then(|b| b.checked_add(off)).is_none_or(|end| end > arena_len)
                    || !off.is_multiple_of(s.dtype.size())
                {
                    bail!(
                        "kernel `{}`: argument {i}, a Buf of {len} elements at byte {off}, is outside the arena of \
                         {arena_len} bytes",
                        l.kernel
                    )
                }
                args.push(DnArg { kind: 0, pad: 0, bits: 0, ptr: arena.wrapping_add(off).cast(), len });
                continue;
            }
            Arg::I32(v) => (1, v as u32 as u64),
            Arg::U32(v) => (2, v as u64),
            Arg::F32(v) => (3, v.to_bits() as u64),
            Arg::U64(v) => (4, v),
        };
        args.push(DnArg { kind, pad: 0, bits, ptr: std::ptr::null_mut(), len: 0 });
    }
    let timeout_ms = timeout.map_or(0, |t| t.as_millis().clamp(1, u32::MAX as u128) as u32);
    let dims = DnDims { grid: l.grid, block: l.block, shared: l.shared, timeout_ms };
    let mut err = [0u8; 2048];
    // SAFETY: the wrapper reads `dims` and `args.len()` arguments; Buf pointers are inside the
    // arena (checked above), which the caller guarantees is valid; the message fits `err`.
    let rc = unsafe { kernel(&dims, args.as_ptr(), args.len(), err.as_mut_ptr().cast(), err.len()) };
    if rc == 0 {
        return Ok(());
    }
    let msg = CStr::from_bytes_until_nul(&err).map(|m| m.to_string_lossy().into_owned()).unwrap_or_default();
    Err(Error(if msg.is_empty() { format!("kernel `{}`: the host layer failed", l.kernel) } else { msg }))
}

/// Runs `l` on the host execution layer over `arena` (4-byte words; for tests of the layer
/// itself; the backend goes through `HostExec`). The time limit is `$DENSENET_HOST_TIMEOUT_S`,
/// else 20 s.
#[doc(hidden)]
pub fn host_launch(arena: &mut [u32], l: &Launch) -> Result<()> {
    launch_with(arena.as_mut_ptr().cast(), arena.len() * 4, l, None)
}

/// [`host_launch`] with the time limit `timeout`.
#[doc(hidden)]
pub fn host_launch_timeout(arena: &mut [u32], l: &Launch, timeout: Duration) -> Result<()> {
    launch_with(arena.as_mut_ptr().cast(), arena.len() * 4, l, Some(timeout))
}
