//! The real GPU through cudarc (driver API, NVRTC, cuDNN), all loaded at run time: nothing CUDA
//! is needed to build or link, and a missing library is a one-line error, never a panic
//! (cudarc panics when a library it calls is absent, so [`GpuExec::new`] checks each first).
//!
//! One stream carries everything: our kernels, cuDNN's convolutions and the copies, so stream
//! order is program order and a captured graph holds all of it. The device holds one allocation,
//! the arena; convolution workspaces are carved from it (see `cudnn.rs`, this module's child).
//!
//! Graphs: a step being recorded runs as it is issued (its first run is the warm-up: cuDNN's
//! lazy set-up happens outside any capture) while its ops are noted; `capture_end` then issues
//! them again under stream capture, which records without running. A step whose capture fails
//! is replayed by issuing its ops again (with a warning), so a step never runs twice or not at all.
//! A step one of whose ops failed while it was recorded is not stored at all: `capture_end`
//! returns an error, and the step is recorded afresh the next time it runs.
//!
//! The kernels are the PTX nvcc built (`kernels::PTX`), or, without it, `kernels::SOURCE`
//! compiled by NVRTC for the device's architecture when the executor opens
//! (`DENSENET_FORCE_NVRTC=1` takes that path even when PTX was built, to test it).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as dr, sys as ds, CudaContext, CudaFunction, CudaGraph, CudaStream, DriverError};
use cudarc::nvrtc;

use super::algos::{self, AlgorithmFamily, Math};
use super::cudnn;
use super::kernels;
use super::launch::{Arg, Exec, Launch, Op};
use super::ptx;
use crate::backend::{ConvShape, ConvSpec, DeviceMemory, Library, Span, View};
use crate::{bail, Error, Result};

/// Largest dynamic shared memory a launch may ask for without opting in per kernel.
const MAX_SHARED: u32 = 48 * 1024;

/// A recorded step: its CUDA graph (`None`: the capture was empty), or, when the capture
/// failed, its ops to issue again.
enum Step {
    Graph(Option<CudaGraph>),
    Ops(Vec<Op>),
}

/// Runs the CUDA backend on a GPU.
pub struct GpuExec {
    // Fields drop in this order after `Drop::drop` synchronized and freed the arena: graphs,
    // cuDNN, kernels (and with them the module), stream, context.
    graphs: HashMap<u64, Step>,
    /// Boxed: the cuDNN side is most of the executor's size.
    convs: Box<cudnn::Convs>,
    kernels: HashMap<&'static str, Kernel>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    /// Device pointer and length in bytes of the arena, once allocated.
    arena: Option<(u64, usize)>,
    /// The ops of the step being recorded (between `capture_begin` and `capture_end`).
    recording: Option<Vec<Op>>,
    /// Whether an op (or a write) of the step being recorded failed: `capture_end` then
    /// abandons the recording.
    recording_failed: bool,
    /// Whether the stream is capturing (inside `capture_end`).
    capturing: bool,
    name: String,
    cc: (i32, i32),
    cudnn: cudnn::Loaded,
    /// The CUDA version the driver supports (`cuDriverGetVersion`: 13000 is 13.0).
    driver_version: i32,
    /// Where the kernels' PTX came from.
    kernels_from: KernelSource,
    /// [`GpuExec::driver_used_bytes`] right after the context was created, before the kernels,
    /// cuDNN and the arena: subtracted, so [`DeviceMemory::process`] leaves the context out.
    baseline_used: usize,
}

// SAFETY: the raw handles inside (cuDNN handle and descriptors, CUDA graphs) are only used
// through `&mut self` or after binding the context to the calling thread, never concurrently;
// cuDNN and the driver allow a handle to move between threads.
unsafe impl Send for GpuExec {}

/// Where the loaded kernels' PTX came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelSource {
    /// nvcc, at build time (`kernels::PTX`).
    Nvcc,
    /// NVRTC, when the executor opened: no PTX was built, or `DENSENET_FORCE_NVRTC=1`.
    Nvrtc,
    /// NVRTC, because the driver refused nvcc's PTX as too new.
    NvrtcForOldDriver,
}

impl KernelSource {
    fn text(self) -> &'static str {
        match self {
            KernelSource::Nvcc => "nvcc at build time",
            KernelSource::Nvrtc => "NVRTC",
            KernelSource::NvrtcForOldDriver => "NVRTC (nvcc's PTX is newer than the driver)",
        }
    }
}

/// A loaded kernel and its parameter sizes in bytes (when the driver can tell them).
struct Kernel {
    func: CudaFunction,
    params: Option<Vec<usize>>,
}

impl GpuExec {
    /// Opens GPU `ordinal` with the convolution algorithms `DENSENET_CUDNN_ALGOS` allows (all
    /// deterministic ones unless it says `gemm`); see [`GpuExec::open`].
    pub fn new(ordinal: usize) -> Result<GpuExec> {
        Self::open(ordinal, AlgorithmFamily::from_env()?)
    }

    /// Opens GPU `ordinal`, choosing among the convolution algorithms of `family`: checks the
    /// driver, the device, cuDNN with the cuBLASLt it loads and (when the kernels were built
    /// without nvcc, or `DENSENET_FORCE_NVRTC=1`) NVRTC, then loads the kernels. Every failure is
    /// a one-line error that says what is missing and how to provide it.
    pub fn open(ordinal: usize, family: AlgorithmFamily) -> Result<GpuExec> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { ds::is_culib_present() } {
            bail!("no CUDA driver (libcuda.so.1 not found): install the NVIDIA driver, or use --device cpu");
        }
        dr::init().map_err(|e| {
            err(format!("the CUDA driver failed to start ({}): is a GPU visible here? Or use --device cpu", errname(e)))
        })?;
        let count = dr::device::get_count().map_err(|e| err(format!("cannot count CUDA devices ({})", errname(e))))?;
        if count <= 0 {
            bail!("no CUDA GPU found (the driver sees none): use --device cpu");
        }
        if ordinal >= count as usize {
            bail!("no CUDA device {ordinal}: the driver sees {count} (cuda:0 to cuda:{})", count - 1);
        }
        let cudnn = cudnn::preflight()?;
        let mut driver_version = 0;
        // SAFETY: writes one int.
        unsafe { ds::cuDriverGetVersion(&mut driver_version) }.result().map_err(|e| drv("cuDriverGetVersion", e))?;
        let ptx = kernels::PTX.filter(|_| !std::env::var("DENSENET_FORCE_NVRTC").is_ok_and(|v| v == "1"));
        if ptx.is_none() && !Self::nvrtc_available() {
            bail!(
                "{}, or rebuild with nvcc on PATH (the kernels were built without it)",
                nvrtc_missing(cudnn, driver_version)
            );
        }

        let ctx = CudaContext::new(ordinal).map_err(|e| drv(&format!("opening CUDA device {ordinal}"), e))?;
        // SAFETY: no CudaSlice is ever created; all work is on one stream, ordered by hand.
        unsafe { ctx.disable_event_tracking() };
        let baseline_used = ctx.mem_get_info().map(|(free, total)| total - free).unwrap_or(0);
        let stream = ctx.new_stream().map_err(|e| drv("creating a CUDA stream", e))?;
        let cc = ctx.compute_capability().map_err(|e| drv("reading the compute capability", e))?;
        let name = ctx.name().map_err(|e| drv("reading the device name", e))?;

        let arch = (cc.0 * 10 + cc.1) as u32;
        let nvrtc_ptx = || Self::nvrtc_compile(nvrtc_arch(arch)?);
        let (ptx, mut kernels_from) = match ptx {
            Some(ptx) => (ptx.to_string(), KernelSource::Nvcc),
            None => (nvrtc_ptx()?, KernelSource::Nvrtc),
        };
        let module = match ctx.load_module(nvrtc::Ptx::from_src(ptx.clone())) {
            // nvcc's PTX is newer than this driver: this machine's NVRTC may be older.
            Err(e) if e.0 == ds::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION && kernels_from == KernelSource::Nvcc => {
                let first = module_error(e, cc, driver_version, kernels_from, &ptx);
                if !Self::nvrtc_available() {
                    bail!("{first}; {}", nvrtc_missing(cudnn, driver_version));
                }
                eprintln!("warning: {first}; compiling the kernels with this machine's NVRTC instead");
                let ptx = nvrtc_ptx()?;
                kernels_from = KernelSource::NvrtcForOldDriver;
                ctx.load_module(nvrtc::Ptx::from_src(ptx.clone())).map_err(|e| {
                    err(format!("{first}; and {}", module_error(e, cc, driver_version, KernelSource::Nvrtc, &ptx)))
                })?
            }
            r => r.map_err(|e| module_error(e, cc, driver_version, kernels_from, &ptx))?,
        };
        let mut loaded = HashMap::new();
        for &k in kernels::NAMES {
            let func = module.load_function(k).map_err(|e| {
                err(format!("kernel {k} is not in the loaded module ({}): kernels must be extern \"C\"", errname(e)))
            })?;
            let params = (driver_version >= 12040).then(|| param_sizes(&func)).filter(|p| !p.is_empty());
            loaded.insert(k, Kernel { func, params });
        }
        let header = algos::Header {
            gpu: name.clone(),
            cc,
            cudnn: (cudnn.version, cudnn.cuda),
            math: Math::for_gpu(cc),
            family,
        };
        let convs = Box::new(cudnn::Convs::new(&stream, ordinal, header)?);
        Ok(GpuExec {
            graphs: HashMap::new(),
            convs,
            kernels: loaded,
            stream,
            ctx,
            arena: None,
            recording: None,
            recording_failed: false,
            capturing: false,
            name,
            cc,
            cudnn,
            driver_version,
            kernels_from,
            baseline_used,
        })
    }

    /// Whether the NVRTC library can be loaded (it is looked up as `libnvrtc.so.13` and the
    /// like through the dynamic loader, so `LD_LIBRARY_PATH` decides).
    pub fn nvrtc_available() -> bool {
        // SAFETY: only tries to dlopen the library.
        unsafe { nvrtc::sys::is_culib_present() }
    }

    /// PTX of the kernels (`kernels::SOURCE`) for virtual architecture `compute_{arch}` (e.g.
    /// 90), compiled by NVRTC with the options the GPU path uses; cached per architecture.
    /// Needs only NVRTC, no driver or GPU.
    pub fn nvrtc_compile(arch: u32) -> Result<String> {
        static CACHE: OnceLock<Mutex<HashMap<u32, String>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(ptx) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&arch) {
            return Ok(ptx.clone());
        }
        if !Self::nvrtc_available() {
            bail!(
                "NVRTC not found (no libnvrtc.so.N the dynamic loader can find): add the folder holding it (pip's \
                 nvidia-cuda-nvrtc puts it in nvidia/cu13/lib) to LD_LIBRARY_PATH"
            );
        }
        let opts = nvrtc::CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{arch}"), "-default-device".into(), "--std=c++17".into()],
            name: Some("kernels.cu".into()),
            ..Default::default()
        };
        let ptx = nvrtc::compile_ptx_with_opts(kernels::SOURCE, opts).map_err(|e| match e {
            nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
                let log = log.to_string_lossy();
                let errors: Vec<&str> = log.lines().filter(|l| l.contains("error")).take(8).collect();
                err(format!(
                    "NVRTC failed to compile the kernels for compute_{arch} ({nvrtc:?}): {}",
                    errors.join(" | ")
                ))
            }
            other => err(format!("NVRTC failed for compute_{arch}: {other:?}")),
        })?;
        let ptx = ptx.to_src();
        cache.lock().unwrap_or_else(|p| p.into_inner()).insert(arch, ptx.clone());
        Ok(ptx)
    }

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
        self.ctx.bind_to_thread().map_err(|e| drv("binding the CUDA context", e))
    }

    fn sync(&self, what: &str) -> Result<()> {
        self.stream.synchronize().map_err(|e| drv(what, e))
    }

    /// Checks and resolves one convolution call: (x/gx address, w address, y/gy address).
    fn conv_args(&self, x: View, w: Span, y: View, spec: ConvSpec, what: &str) -> Result<(u64, u64, u64)> {
        let fits = spec.stride > 0 && spec.k > 0 && x.h + 2 * spec.pad >= spec.k && x.w + 2 * spec.pad >= spec.k;
        if !fits || x.n != y.n || spec.out(x.h) != y.h || spec.out(x.w) != y.w {
            bail!("{what}: views {x:?} and {y:?} do not match {spec:?}");
        }
        if w.len != y.c * x.c * spec.k * spec.k {
            bail!("{what}: a weight of {} elements for {x:?} -> {y:?}", w.len);
        }
        let wx = self.addr(w.off, w.bytes(), what)?;
        Ok((self.view_addr(x, what)?, wx, self.view_addr(y, what)?))
    }

    /// Whether a step is being recorded or captured (no copies, allocations or cudnnFind then).
    fn in_step(&self) -> bool {
        self.recording.is_some() || self.capturing
    }

    /// Queues `op` on the stream.
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
        }
    }

    /// Runs `op` now, and notes it when a step is being recorded (a failed op marks the
    /// recording as failed instead: it is not part of a step that can be replayed).
    fn submit(&mut self, op: Op) -> Result<()> {
        let r = self.issue(&op);
        if let Some(ops) = &mut self.recording {
            match r {
                Ok(()) => ops.push(op),
                Err(_) => self.recording_failed = true,
            }
        }
        r
    }

    /// Issues `ops` under stream capture (nothing runs) and instantiates the graph.
    fn capture(&mut self, ops: &[Op]) -> Result<Option<CudaGraph>> {
        self.stream
            .begin_capture(ds::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| drv("starting a CUDA graph capture", e))?;
        self.capturing = true;
        let issued = ops.iter().try_for_each(|op| self.issue(op));
        self.capturing = false;
        // Always end the capture, also after a failed op. cudarc's `end_capture` returns early,
        // leaving the stream capturing, on an error stored by an earlier drop: `bind` takes it.
        let _ = self.bind();
        let graph = self.stream.end_capture(ds::CUgraphInstantiate_flags(0));
        issued?;
        graph.map_err(|e| {
            err(format!(
                "CUDA graph capture failed ({}): something queued during the capture cannot be captured",
                errname(e)
            ))
        })
    }

    /// A kernel launch, checked and queued.
    fn launch_now(&mut self, l: &Launch) -> Result<()> {
        let Some(k) = self.kernels.get(l.kernel) else { bail!("no kernel named {} in kernels/*.cu", l.kernel) };
        let threads: u64 = l.block.iter().map(|&b| b as u64).product();
        if threads == 0 || threads > 1024 || l.block[2] > 64 {
            bail!("{}: block {:?} is not 1 to 1024 threads", l.kernel, l.block);
        }
        if l.grid.contains(&0) || l.grid[0] > i32::MAX as u32 || l.grid[1] > 65535 || l.grid[2] > 65535 {
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
        .map_err(|e| err(format!("launching {} failed: {}", l.kernel, errname(e))))
    }
}

impl Drop for GpuExec {
    fn drop(&mut self) {
        let _ = self.bind();
        if self.capturing {
            // SAFETY: ends the capture this executor began on its own stream.
            if let Ok(g) = unsafe { dr::stream::end_capture(self.stream.cu_stream()) } {
                if !g.is_null() {
                    // SAFETY: the graph was just returned by the driver and is not used again.
                    let _ = unsafe { dr::graph::destroy(g) };
                }
            }
        }
        let _ = self.stream.synchronize();
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
        Ok(bytes.next_multiple_of(4))
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
        // SAFETY: a plain device allocation, freed in Drop.
        let ptr = unsafe { dr::malloc_sync(bytes) }.map_err(|e| {
            let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
            err(format!(
                "cannot allocate the {:.1} MiB GPU arena ({}): {:.1} MiB free of {:.1} MiB; use a smaller batch or --memory minimal",
                mib(bytes),
                errname(e),
                mib(free),
                mib(total)
            ))
        })?;
        self.arena = Some((ptr, len));
        // SAFETY: `ptr` holds `bytes` bytes.
        unsafe { dr::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| drv("zeroing the arena", e))?;
        self.sync("zeroing the arena")?;
        self.convs.set_workspace(ptr + conv_ws.off as u64, conv_ws.bytes());
        Ok(())
    }

    fn write(&mut self, off: usize, data: &[u8]) -> Result<()> {
        if self.recording.is_some() {
            // The step would replay without this copy: abandon its recording.
            self.recording_failed = true;
        }
        let dst = self.addr(off, data.len(), "write")?;
        if self.in_step() {
            bail!("write to the GPU arena during graph capture (copies from host memory cannot be captured)");
        }
        if data.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `dst` holds `data.len()` bytes (checked); the sync below keeps `data` alive
        // until the copy has finished.
        unsafe { dr::memcpy_htod_async(dst, data, self.stream.cu_stream()) }
            .map_err(|e| drv("copying to the GPU", e))?;
        self.sync("copying to the GPU (or an earlier kernel failed)")
    }

    fn read_into(&self, off: usize, out: &mut [u8]) -> Result<()> {
        let src = self.addr(off, out.len(), "read")?;
        if self.in_step() {
            bail!("read from the GPU arena during graph capture");
        }
        if out.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `src` holds `out.len()` bytes (checked); the sync below completes the copy
        // before `out` is released.
        unsafe { dr::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }
            .map_err(|e| drv("copying from the GPU", e))?;
        self.sync("copying from the GPU (or an earlier kernel failed)")
    }

    fn launch(&mut self, l: &Launch) -> Result<()> {
        if self.recording.is_none() {
            return self.launch_now(l);
        }
        self.submit(Op::launch(l))
    }

    fn conv_forward(&mut self, x: View, w: Span, y: View, spec: ConvSpec) -> Result<()> {
        self.submit(Op::ConvForward(x, w, y, spec))
    }

    fn conv_backward_data(&mut self, gy: View, w: Span, gx: View, spec: ConvSpec) -> Result<()> {
        self.submit(Op::ConvBackwardData(gy, w, gx, spec))
    }

    fn conv_backward_filter(&mut self, x: View, gy: View, gw: Span, spec: ConvSpec, accumulate: bool) -> Result<()> {
        self.submit(Op::ConvBackwardFilter(x, gy, gw, spec, accumulate))
    }

    fn capture_begin(&mut self) -> Result<()> {
        if self.in_step() {
            bail!("capture_begin while a capture is already running");
        }
        self.recording = Some(Vec::new());
        self.recording_failed = false;
        Ok(())
    }

    fn capture_end(&mut self, key: u64) -> Result<Option<String>> {
        let Some(ops) = self.recording.take() else { bail!("capture_end without capture_begin") };
        if std::mem::take(&mut self.recording_failed) {
            // A step with a failed op is not recorded: no graph (nor ops to replay) is stored,
            // and a stale one under this key is dropped, so the step is recorded afresh.
            self.graphs.remove(&key);
            bail!("an op of the step failed while it was recorded: the recording is abandoned");
        }
        // The step has already run, op by op, as it was issued; capturing records it again.
        let (step, fell_back) = match self.capture(&ops) {
            Ok(graph) => (Step::Graph(graph), None),
            Err(e) => (Step::Ops(ops), Some(e.to_string())),
        };
        self.graphs.insert(key, step);
        Ok(fell_back)
    }

    fn replay(&mut self, key: u64) -> Result<bool> {
        let Some(step) = self.graphs.remove(&key) else { return Ok(false) };
        let r = match &step {
            Step::Graph(Some(g)) => g.launch().map_err(|e| drv("launching a CUDA graph", e)),
            Step::Graph(None) => Ok(()),
            Step::Ops(ops) => ops.iter().try_for_each(|op| self.issue(op)),
        };
        self.graphs.insert(key, step);
        r.map(|()| true)
    }
}

/// The newest architecture NVRTC supports that runs on a device of architecture `device`
/// (e.g. 90 for sm_90).
fn nvrtc_arch(device: u32) -> Result<u32> {
    let mut n = 0;
    // SAFETY: NVRTC is loaded (checked by the caller); the calls write `n` ints.
    let archs = unsafe {
        nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n);
        let mut v = vec![0; n.max(0) as usize];
        nvrtc::sys::nvrtcGetSupportedArchs(v.as_mut_ptr());
        v
    };
    if archs.is_empty() {
        return Ok(device);
    }
    match archs.iter().map(|&a| a as u32).filter(|&a| a <= device).max() {
        Some(a) => Ok(a),
        None => bail!(
            "this NVRTC does not support sm_{device} (oldest it knows: sm_{}): use an older CUDA's NVRTC",
            archs[0]
        ),
    }
}

/// The parameter sizes of `f` in bytes, as the driver reports them (empty when it cannot).
fn param_sizes(f: &CudaFunction) -> Vec<usize> {
    let mut sizes = Vec::new();
    for i in 0..256 {
        let (mut off, mut size) = (0, 0);
        // SAFETY: `f` is a loaded function; the call writes two integers or fails past the end.
        let r = unsafe { ds::cuFuncGetParamInfo(f.cu_function(), i, &mut off, &mut size) };
        if r != ds::CUresult::CUDA_SUCCESS {
            break;
        }
        sizes.push(size);
    }
    sizes
}

/// Bytes of a kernel parameter.
fn arg_size(a: &Arg) -> usize {
    match a {
        Arg::Buf { .. } | Arg::U64(_) => 8,
        Arg::I32(_) | Arg::U32(_) | Arg::F32(_) => 4,
    }
}

/// A 64-bit slot whose first four bytes in memory are `b`.
fn low(b: [u8; 4]) -> u64 {
    let mut s = [0; 8];
    s[..4].copy_from_slice(&b);
    u64::from_ne_bytes(s)
}

/// The module failed to load: say why in terms of what to change.
fn module_error(e: DriverError, cc: (i32, i32), driver: i32, source: KernelSource, ptx_text: &str) -> Error {
    let source = source.text();
    match e.0 {
        ds::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
            err(too_new(ptx::isa(ptx_text), driver.max(0) as u32, source))
        }
        ds::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU | ds::CUresult::CUDA_ERROR_INVALID_PTX => err(format!(
            "the kernels' PTX (from {source}) does not run on sm_{}{} ({}): rebuild with DENSENET_CUDA_ARCH unset or \
             set to sm_{}{}",
            cc.0,
            cc.1,
            errname(e),
            cc.0,
            cc.1
        )),
        _ => drv("loading the kernels", e),
    }
}

/// Why PTX of ISA `isa` (from `source`) does not load on a driver for CUDA `driver`, and
/// exactly what to rebuild with.
fn too_new(isa: Option<(u32, u32)>, driver: ptx::CudaVersion, source: &str) -> String {
    let have = ptx::cuda_text(driver);
    let what = match isa {
        Some(v) => ptx::describe(v),
        None => "PTX without a .version directive".into(),
    };
    format!(
        "the CUDA driver (for CUDA {have}) is older than the kernels' PTX from {source} ({what}): update the NVIDIA \
         driver, or rebuild with the nvcc of CUDA {have} or older (NVCC=/path/to/nvcc cargo build --release), or put \
         an NVRTC of CUDA {have} or older on LD_LIBRARY_PATH"
    )
}

/// The error for a missing NVRTC: which library, of the CUDA major version cuDNN was built
/// for, and the pip package of a release no newer than the driver (`driver`, as
/// `cuDriverGetVersion` counts it), whose PTX the driver loads.
fn nvrtc_missing(cudnn: cudnn::Loaded, driver: i32) -> String {
    let major = cudnn.cuda_major();
    let name = if major >= 13 { "nvidia-cuda-nvrtc".to_string() } else { format!("nvidia-cuda-nvrtc-cu{major}") };
    let driver = driver.max(0) as usize;
    let pkg = match driver / 1000 {
        d if d == major => format!("'{name}=={major}.{}.*'", driver % 1000 / 10),
        d if d < major => format!("'{name}=={major}.0.*'"),
        _ => name,
    };
    format!(
        "NVRTC not found (libnvrtc.so.{major}, for CUDA {major} like cuDNN): pip install {pkg} and add the folder \
         holding libnvrtc.so.{major} to LD_LIBRARY_PATH"
    )
}

/// The loaded NVRTC's version (`13.0`), if it loads.
fn nvrtc_version() -> Option<String> {
    if !GpuExec::nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC loads (checked); the call writes two ints.
    unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result().ok()?;
    Some(format!("{major}.{minor}"))
}

fn err(msg: String) -> Error {
    Error(msg)
}

/// A driver error as `what failed: CUDA_ERROR_...`.
fn drv(what: &str, e: DriverError) -> Error {
    err(format!("{what} failed: {}", errname(e)))
}

/// The driver's name for an error (`CUDA_ERROR_OUT_OF_MEMORY`).
fn errname(e: DriverError) -> String {
    e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0))
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_too_new_ptx_says_what_it_needs_and_what_to_rebuild_with() {
        let m = too_new(Some((9, 0)), 12080, "nvcc at build time");
        for part in [
            "driver (for CUDA 12.8)",
            "PTX ISA 9.0: needs a driver for CUDA 13.0 or newer (Linux 580.65.06 or newer)",
            "rebuild with the nvcc of CUDA 12.8 or older",
            "an NVRTC of CUDA 12.8 or older",
        ] {
            assert!(m.contains(part), "{part:?} not in {m:?}");
        }
        assert!(too_new(None, 12080, "NVRTC").contains("PTX without a .version directive"));
    }

    #[test]
    fn missing_nvrtc_is_named_for_cudnns_cuda_and_the_driver() {
        let cu13 = cudnn::Loaded { version: 91300, cuda: 13000, cublaslt: 130001 };
        let cu12 = cudnn::Loaded { cuda: 12090, ..cu13 };
        let m = nvrtc_missing(cu13, 13000);
        assert!(m.contains("libnvrtc.so.13") && m.contains("pip install 'nvidia-cuda-nvrtc==13.0.*'"), "{m}");
        let m = nvrtc_missing(cu12, 12080);
        assert!(m.contains("libnvrtc.so.12") && m.contains("'nvidia-cuda-nvrtc-cu12==12.8.*'"), "{m}");
        // A driver newer than cuDNN's CUDA loads the PTX of any NVRTC of that major version.
        assert!(nvrtc_missing(cu12, 13000).contains("pip install nvidia-cuda-nvrtc-cu12 and"));
        assert_eq!(cu13.version_text(), "9.13.0");
        assert_eq!(cu13.cublaslt_text(), "13.0.1");
        assert_eq!(cu12.cuda_major(), 12);
    }
}
