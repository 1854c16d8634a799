//! [`GpuExec`] at work: checked kernel launches and cuDNN convolutions queued on its stream,
//! copies, the arena, and recorded steps captured as CUDA graphs.

use std::ffi::c_void;

use cudarc::driver::{result as dr, sys as ds, CudaGraph, DriverError};

use super::open::nvrtc_version;
use super::{driver_failed, errname, nccl, GpuExec, KernelSource, Step};
use crate::backend::cuda::algos;
use crate::backend::cuda::launch::{Arg, Exec, Launch};
use crate::backend::cuda::ptx;
use crate::backend::cuda::record::{recorded_exec_methods, Op, Recorder, Steps};
use crate::backend::{Collective, ConvShape, ConvSpec, DType, DeviceMemory, Library, Span, View};
use crate::comm::rendezvous::Links;
use crate::comm::Group;
use crate::measure::mib;
use crate::{bail, Error, Result};

// CUDA's launch limits, the same for every compute capability since 3.0 (the CUDA C++
// Programming Guide's table of technical specifications).
/// Most threads in a block.
const MAX_THREADS: u64 = 1024;
/// Most threads along a block's z axis.
const MAX_BLOCK_Z: u32 = 64;
/// Most blocks along the grid's x axis (2^31 - 1).
const MAX_GRID_X: u32 = i32::MAX as u32;
/// Most blocks along the grid's y and z axes.
const MAX_GRID_YZ: u32 = 65535;
/// Largest dynamic shared memory a launch may ask for without opting in per kernel.
const MAX_SHARED: u32 = 48 * 1024;

impl GpuExec {
    /// Bytes this executor allocated on the device (the arena; zero before `allocate`).
    fn device_bytes(&self) -> usize {
        self.arena.map_or(0, |(_, bytes)| bytes.max(1))
    }

    /// Device memory in use now, by every process and context, as the driver counts it
    /// (total minus free); `None` if the driver cannot tell.
    fn driver_used_bytes(&self) -> Option<usize> {
        self.ctx.mem_get_info().ok().map(|(free, total)| total - free)
    }

    /// Device address of arena byte `off`, checking that `len` bytes from it are inside.
    fn addr(&self, off: usize, len: usize, what: &str) -> Result<u64> {
        let Some((base, bytes)) = self.arena else { bail!("{what}: the GPU arena is not allocated yet") };
        match off.checked_add(len) {
            Some(end) if end <= bytes => Ok(base + off as u64),
            _ => bail!("{what}: bytes {off}..{off}+{len} are outside the arena of {bytes} bytes"),
        }
    }

    /// The arena address of a view's first element, after checking the whole view is inside.
    fn view_addr(&self, v: View, what: &str) -> Result<u64> {
        self.addr(v.off, v.end() - v.off, what)
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_failed("binding the CUDA context", e))
    }

    /// Waits for the stream (under NCCL's watchdog in a job).
    fn sync(&self, what: &str) -> Result<()> {
        let wait = || self.stream.synchronize().map_err(|e| driver_failed(what, e));
        match &self.nccl {
            Some(n) => n.watched(wait),
            None => wait(),
        }
    }

    /// Checks and resolves one convolution call: (x/gx address, w address, y/gy address).
    fn conv_args(&self, x: View, w: Span, y: View, spec: ConvSpec, what: &str) -> Result<(u64, u64, u64)> {
        if !algos::is_convolution(spec, x.h, x.w) || x.n != y.n || spec.out(x.h) != y.h || spec.out(x.w) != y.w {
            bail!("{what}: views {x:?} and {y:?} do not match {spec:?}");
        }
        if w.len != y.c * x.c * spec.k * spec.k {
            bail!("{what}: a weight of {} elements for {x:?} -> {y:?}", w.len);
        }
        let wx = self.addr(w.off, w.bytes(), what)?;
        Ok((self.view_addr(x, what)?, wx, self.view_addr(y, what)?))
    }

    /// A copy of `len` bytes between the host and arena byte `off`, outside any step: `copy`
    /// queues it on the stream given the device address, and the stream is synchronized, so
    /// that the host side may be released after.
    fn host_copy(
        &self,
        off: usize,
        len: usize,
        way: &Way,
        copy: impl FnOnce(u64, ds::CUstream) -> std::result::Result<(), DriverError>,
    ) -> Result<()> {
        let addr = self.addr(off, len, way.what)?;
        if self.in_step() {
            bail!("{}", way.in_step);
        }
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        copy(addr, self.stream.cu_stream()).map_err(|e| driver_failed(way.doing, e))?;
        self.sync(&format!("{} (or an earlier kernel failed)", way.doing))
    }

    /// Whether a step is being recorded or captured (no copies, allocations or cudnnFind then).
    fn in_step(&self) -> bool {
        self.steps.recording() || self.capturing
    }

    /// Issues `ops` under stream capture (nothing runs) and instantiates the graph. A step with
    /// NCCL collectives is not captured (replayed op by op), until captured ones are measured
    /// on a GPU.
    fn capture(&mut self, ops: &[Op]) -> Result<Option<CudaGraph>> {
        if ops.iter().any(|op| matches!(op, Op::Collective(_))) {
            bail!("a step with NCCL collectives is issued op by op, not captured");
        }
        self.stream
            .begin_capture(ds::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| driver_failed("starting a CUDA graph capture", e))?;
        self.capturing = true;
        let issued = self.issue_ops(ops);
        self.capturing = false;
        // Always end the capture, also after a failed op. cudarc's `end_capture` returns early,
        // leaving the stream capturing, on an error stored by an earlier drop: `bind` takes it.
        let _ = self.bind();
        let graph = self.stream.end_capture(ds::CUgraphInstantiate_flags(0));
        issued?;
        graph.map_err(|e| {
            Error(format!(
                "CUDA graph capture failed ({}): something queued during the capture cannot be captured",
                errname(e)
            ))
        })
    }

    /// A kernel launch, checked and queued.
    fn launch_now(&mut self, l: &Launch) -> Result<()> {
        let Some(k) = self.kernels.get(l.kernel) else { bail!("no kernel named {} in kernels/*.cu", l.kernel) };
        let threads: u64 = l.block.iter().map(|&b| b as u64).product();
        if threads == 0 || threads > MAX_THREADS || l.block[2] > MAX_BLOCK_Z {
            bail!("{}: block {:?} is not 1 to {MAX_THREADS} threads", l.kernel, l.block);
        }
        if l.grid.contains(&0) || l.grid[0] > MAX_GRID_X || l.grid[1] > MAX_GRID_YZ || l.grid[2] > MAX_GRID_YZ {
            bail!("{}: grid {:?} is out of range", l.kernel, l.grid);
        }
        if l.shared > MAX_SHARED {
            bail!("{}: {} bytes of shared memory, more than {MAX_SHARED}", l.kernel, l.shared);
        }
        if let Some(params) = &k.params {
            let sizes: Vec<usize> = l.args.iter().map(arg_size).collect();
            if &sizes != params {
                bail!("{}: argument sizes {sizes:?} do not match the kernel's parameters {params:?}", l.kernel);
            }
        }
        let mut slots = Vec::with_capacity(l.args.len());
        for a in l.args {
            slots.push(match *a {
                Arg::Buf(s) => self.addr(s.off, s.bytes(), l.kernel)?,
                Arg::I32(v) => low(v.to_ne_bytes()),
                Arg::U32(v) => low(v.to_ne_bytes()),
                Arg::F32(v) => low(v.to_ne_bytes()),
                Arg::U64(v) => v,
            });
        }
        let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        self.bind()?;
        let (g, b) = (l.grid, l.block);
        // SAFETY: the function is from our module; each parameter points at a value of the size
        // the kernel expects (checked above when the driver can tell), buffers are inside the
        // arena, and `slots` outlives the call (the driver copies parameters at launch).
        unsafe {
            dr::launch_kernel(
                k.func.cu_function(),
                (g[0], g[1], g[2]),
                (b[0], b[1], b[2]),
                l.shared,
                self.stream.cu_stream(),
                &mut ptrs,
            )
        }
        .map_err(|e| Error(format!("launching {} failed: {}", l.kernel, errname(e))))
    }
}

impl Recorder for GpuExec {
    type Step = Step;

    fn steps(&mut self) -> &mut Steps<Step> {
        &mut self.steps
    }

    fn issue(&mut self, op: &Op) -> Result<()> {
        match *op {
            Op::Launch { kernel, grid, block, shared, ref args } => {
                self.launch_now(&Launch { kernel, grid, block, shared, args })
            }
            Op::ConvForward(x, w, y, spec) => {
                let (px, pw, py) = self.conv_args(x, w, y, spec, "conv_forward")?;
                self.bind()?;
                self.convs.forward((x, px), pw, (y, py), spec)
            }
            Op::ConvBackwardData(gy, w, gx, spec) => {
                let (px, pw, py) = self.conv_args(gx, w, gy, spec, "conv_backward_data")?;
                self.bind()?;
                self.convs.backward_data((gx, px), pw, (gy, py), spec)
            }
            Op::ConvBackwardFilter(x, gy, gw, spec, accumulate) => {
                let (px, pw, py) = self.conv_args(x, gw, gy, spec, "conv_backward_filter")?;
                self.bind()?;
                self.convs.backward_filter((x, px), pw, (gy, py), spec, accumulate)
            }
            Op::Collective(c) => {
                let Some(nccl) = &self.nccl else { bail!("a collective on a GPU that has not joined a job") };
                c.check(nccl.group().world).map_err(Error)?;
                let spans = match c {
                    Collective::AllReduce { src, dst } | Collective::AllGather { src, dst } => [src, dst],
                    Collective::Broadcast(s) => [s, s],
                };
                for s in spans {
                    self.addr(s.off, s.bytes(), "a collective")?;
                }
                let base = self.addr(0, 0, "a collective")?;
                self.bind()?;
                nccl.issue(c, base, self.stream.cu_stream() as cudarc::nccl::sys::cudaStream_t)
            }
        }
    }

    fn issue_step(&mut self, step: &Step) -> Result<()> {
        match step {
            Step::Graph(Some(g)) => g.launch().map_err(|e| driver_failed("launching a CUDA graph", e)),
            Step::Graph(None) => Ok(()),
            Step::Ops(ops) => self.issue_ops(ops),
        }
    }
}

impl Drop for GpuExec {
    fn drop(&mut self) {
        let _ = self.bind();
        if self.capturing {
            // SAFETY: ends the capture this executor began on its own stream, which is still live
            // (fields drop after this); the graph it returns is destroyed below.
            if let Ok(g) = unsafe { dr::stream::end_capture(self.stream.cu_stream()) } {
                if !g.is_null() {
                    // SAFETY: the graph was just returned by the driver and is not used again.
                    let _ = unsafe { dr::graph::destroy(g) };
                }
            }
        }
        // Under NCCL's watchdog: a job whose collectives hang ends here too.
        let _ = self.sync("finishing the GPU's work");
        if let Some((ptr, _)) = self.arena.take() {
            // SAFETY: allocated by `allocate`, all work that used it has finished.
            let _ = unsafe { dr::free_sync(ptr) };
        }
    }
}

impl Exec for GpuExec {
    fn memory(&self) -> DeviceMemory {
        let process = self.driver_used_bytes().map(|u| u.saturating_sub(self.baseline_used));
        DeviceMemory { allocated: self.device_bytes(), process }
    }

    fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{}, driver for CUDA {}, cuDNN {} for CUDA {}, kernels from {})",
            self.ctx.ordinal(),
            self.name,
            self.cc.0,
            self.cc.1,
            ptx::cuda_text(self.driver_version.max(0) as u32),
            self.cudnn.version_text(),
            ptx::cuda_text(self.cudnn.cuda as u32),
            self.kernels_from.text()
        )
    }

    fn libraries(&self) -> Vec<Library> {
        let cuda = ptx::cuda_text(self.cudnn.cuda as u32);
        let driver = ptx::cuda_text(self.driver_version.max(0) as u32);
        let mut libs = vec![
            Library::loaded("cuda driver", driver.clone(), Some(driver), "libcuda.so"),
            Library::loaded("cudnn", self.cudnn.version_text(), Some(cuda), "libcudnn.so"),
            Library::loaded("cublaslt", self.cudnn.cublaslt_text(), None, "libcublasLt.so"),
        ];
        if self.kernels_from != KernelSource::Nvcc {
            libs.push(Library::loaded("nvrtc", nvrtc_version().unwrap_or_default(), None, "libnvrtc.so"));
        }
        if self.nccl.is_some() {
            libs.extend(nccl::api().ok().map(|api| api.loaded()));
        }
        libs
    }

    fn algorithm_record(&self) -> Option<String> {
        Some(self.convs.record())
    }

    fn reuse_algorithm_record(&mut self, record: &str) -> Result<usize> {
        self.convs.reuse(record)
    }

    fn algorithm_searches(&self) -> usize {
        self.convs.finds()
    }

    fn conv_workspace_len(&mut self, convs: &[ConvShape], batch: usize) -> Result<usize> {
        if self.in_step() {
            // cudnnFind allocates, synchronizes and times: none of that may happen in a capture.
            bail!("choosing convolution algorithms during a CUDA graph capture");
        }
        self.bind()?;
        let bytes = self.convs.plan(convs, batch)?;
        Ok(bytes.next_multiple_of(DType::F32.size()))
    }

    fn allocate(&mut self, len: usize, conv_ws: Span) -> Result<()> {
        if self.arena.is_some() {
            bail!("the GPU arena is already allocated");
        }
        if self.in_step() {
            bail!("allocating the GPU arena during a CUDA graph capture");
        }
        if conv_ws.end() > len {
            bail!("convolution workspace {conv_ws:?} is outside the arena of {len} bytes");
        }
        self.bind()?;
        let bytes = len.max(1);
        // SAFETY: the context is bound (above); the allocation is kept in `self.arena` and freed
        // once, in Drop.
        let ptr = unsafe { dr::malloc_sync(bytes) }.map_err(|e| {
            let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
            Error(format!(
                "cannot allocate the {:.1} MiB GPU arena ({}): {:.1} MiB free of {:.1} MiB; use a smaller batch or \
                 --memory minimal",
                mib(bytes),
                errname(e),
                mib(free),
                mib(total)
            ))
        })?;
        self.arena = Some((ptr, len));
        // SAFETY: `ptr` was just allocated with `bytes` bytes, in the context of this stream.
        unsafe { dr::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| driver_failed("zeroing the arena", e))?;
        self.sync("zeroing the arena")?;
        self.convs.set_workspace(ptr + conv_ws.off as u64, conv_ws.bytes());
        Ok(())
    }

    fn write(&mut self, off: usize, data: &[u8]) -> Result<()> {
        // The step would replay without this copy: abandon its recording.
        self.steps.abandon();
        // SAFETY: `host_copy` checked that `dst` holds `data.len()` bytes, and waits for the copy
        // to finish, so `data` outlives it.
        self.host_copy(off, data.len(), &TO_GPU, |dst, s| unsafe { dr::memcpy_htod_async(dst, data, s) })
    }

    fn read_into(&self, off: usize, out: &mut [u8]) -> Result<()> {
        // SAFETY: `host_copy` checked that `src` holds `out.len()` bytes, and waits for the copy
        // to finish, so `out` outlives it.
        self.host_copy(off, out.len(), &FROM_GPU, |src, s| unsafe { dr::memcpy_dtoh_async(out, src, s) })
    }

    fn launch(&mut self, l: &Launch) -> Result<()> {
        if !self.steps.recording() {
            return self.launch_now(l);
        }
        self.submit(Op::launch(l))
    }

    fn join(&mut self, links: Links) -> Result<()> {
        if self.nccl.is_some() {
            bail!("this GPU has joined a job already");
        }
        let api = nccl::api()?;
        self.bind()?;
        self.nccl = Some(nccl::Nccl::join(api, links)?);
        Ok(())
    }

    fn group(&self) -> Option<Group> {
        self.nccl.as_ref().map(nccl::Nccl::group)
    }

    recorded_exec_methods!();

    fn capture_end(&mut self, key: u64) -> Result<Option<String>> {
        let ops = self.steps.end(key)?;
        // The step has already run, op by op, as it was issued; capturing records it again.
        let (step, fell_back) = match self.capture(&ops) {
            Ok(graph) => (Step::Graph(graph), None),
            Err(e) => (Step::Ops(ops), Some(e.to_string())),
        };
        self.steps.store(key, step);
        Ok(fell_back)
    }
}

/// How the errors of a host copy name it, by the way it goes.
struct Way {
    /// The copy, for an arena range error.
    what: &'static str,
    /// The copy under way, for a driver error.
    doing: &'static str,
    /// The error of a copy inside a step.
    in_step: &'static str,
}

/// [`Exec::write`].
const TO_GPU: Way = Way {
    what: "write",
    doing: "copying to the GPU",
    in_step: "write to the GPU arena during graph capture (copies from host memory cannot be captured)",
};

/// [`Exec::read_into`].
const FROM_GPU: Way =
    Way { what: "read", doing: "copying from the GPU", in_step: "read from the GPU arena during graph capture" };

/// Bytes of a kernel parameter (a buffer is a device address).
fn arg_size(a: &Arg) -> usize {
    match a {
        Arg::Buf(_) | Arg::U64(_) => size_of::<u64>(),
        Arg::I32(_) | Arg::U32(_) | Arg::F32(_) => size_of::<u32>(),
    }
}

/// A 64-bit slot whose first four bytes in memory are `b`.
fn low(b: [u8; 4]) -> u64 {
    let mut s = [0; 8];
    s[..4].copy_from_slice(&b);
    u64::from_ne_bytes(s)
}
