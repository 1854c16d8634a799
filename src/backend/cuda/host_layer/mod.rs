//! Rust side of the host execution layer (`kernels/host/`, docs/host-layer.md): runs a
//! [`Launch`] of our CUDA C++ kernels, compiled for the CPU by `build/host.rs`, with every GPU
//! thread a fiber. Out-of-range indices, reads of unwritten or racing shared memory, divergent
//! barriers, misused warp collectives, bad launch configurations and launches past the time
//! limit are errors naming the kernel, block and thread.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::time::Duration;

use super::launch::{Arg, Launch};
use crate::{bail, Error, Result};

/// Bytes of the buffer a failed launch writes its message into: room for the host layer's
/// longest (`FULL_MSG` bytes in kernels/host/dn_host.cpp; a longer one would be cut short).
const MESSAGE_BYTES: usize = 2048;

/// The launch configuration (`DnDims` in kernels/host/dn_rt.h).
#[repr(C)]
struct DnDims {
    grid: [u32; 3],
    block: [u32; 3],
    shared: u32,
    /// 0: `$DENSENET_HOST_TIMEOUT_S`, else 20 s.
    timeout_ms: u32,
}

/// The kind of a kernel argument (`dn::ArgKind` in kernels/host/dn_rt.h).
#[repr(u32)]
#[derive(Clone, Copy)]
enum ArgKind {
    Buf = 0,
    I32 = 1,
    U32 = 2,
    F32 = 3,
    U64 = 4,
}

/// One kernel argument (`DnArg` in kernels/host/dn_rt.h).
#[repr(C)]
struct DnArg {
    kind: ArgKind,
    pad: u32,
    bits: u64,
    ptr: *mut c_void,
    len: usize,
}

/// A generated wrapper `dn_host_<kernel>`: 0, or nonzero with a message in the buffer.
type HostFn = unsafe extern "C" fn(*const DnDims, *const DnArg, usize, *mut c_char, usize) -> c_int;

include!(concat!(env!("OUT_DIR"), "/host_kernels.rs"));

/// Runs `l` on the host layer over `arena`.
pub(crate) fn launch(arena: &mut [u8], l: &Launch) -> Result<()> {
    launch_with(arena, l, None)
}

/// [`launch`] with a time limit (`None`: `$DENSENET_HOST_TIMEOUT_S`, else the layer's default).
fn launch_with(arena: &mut [u8], l: &Launch, timeout: Option<Duration>) -> Result<()> {
    let arena_len = arena.len();
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
                let ptr = arena.as_mut_ptr().wrapping_add(off).cast();
                args.push(DnArg { kind: ArgKind::Buf, pad: 0, bits: 0, ptr, len });
                continue;
            }
            Arg::I32(v) => (ArgKind::I32, v as u32 as u64),
            Arg::U32(v) => (ArgKind::U32, v as u64),
            Arg::F32(v) => (ArgKind::F32, v.to_bits() as u64),
            Arg::U64(v) => (ArgKind::U64, v),
        };
        args.push(DnArg { kind, pad: 0, bits, ptr: std::ptr::null_mut(), len: 0 });
    }
    let timeout_ms = timeout.map_or(0, |t| t.as_millis().clamp(1, u32::MAX as u128) as u32);
    let dims = DnDims { grid: l.grid, block: l.block, shared: l.shared, timeout_ms };
    let mut message = [0u8; MESSAGE_BYTES];
    // SAFETY: the wrapper reads `dims` and `args.len()` arguments; Buf pointers are inside the
    // arena (checked above), borrowed mutably for the whole call; the wrapper writes at most
    // `message.len()` bytes, NUL included (snprintf).
    let rc = unsafe { kernel(&dims, args.as_ptr(), args.len(), message.as_mut_ptr().cast(), message.len()) };
    if rc == 0 {
        return Ok(());
    }
    let msg = CStr::from_bytes_until_nul(&message).map(|m| m.to_string_lossy().into_owned()).unwrap_or_default();
    Err(Error(if msg.is_empty() { format!("kernel `{}`: the host layer failed", l.kernel) } else { msg }))
}

#[cfg(test)]
mod tests;
