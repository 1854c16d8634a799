//! cuDNN convolutions of [`GpuExec`](super::GpuExec), through cudarc's `result`/`sys` layers
//! (the safe layer has no strided descriptors over raw addresses).
//!
//! Reproducibility: within a process, results are bitwise reproducible. Math is FMA (no TF32),
//! only deterministic algorithms are used, and the algorithm choices are the same for every
//! executor of the process on the same GPU: cudnnFind's rankings are kept in a process-wide
//! cache (keyed by device ordinal, shape, planned batch and direction), and the run-time choice
//! for a geometry is a deterministic function of that ranking and the workspace size. Across
//! processes cuDNN's timings may rank the algorithms differently, so the last bits may differ:
//! a resumed run is exact only when the same algorithms are chosen.
//!
//! Views are channel slices of larger NCHW buffers, so every tensor descriptor carries explicit
//! strides (image stride, h*w, w, 1).
//!
//! Algorithms: [`Convs::plan`] times every algorithm once per convolution shape, planned batch
//! and direction with cudnnFind (on dense tensors of the full planned batch; it allocates its own
//! buffers, since it runs before the arena exists), unless an executor of the process already
//! did, and sizes the workspace for, per shape and direction, the algorithm with the smallest
//! workspace among those within 10% of the fastest. Fused convolutions (a BN-ReLU applied into a
//! scratch first) do not run at the full batch, though: they run in chunks of
//! [`super::FUSED_CHUNK`] images on the dense scratch, and their filter gradients then accumulate
//! over the chunks with beta = 1. So the workspace also covers the fallback algorithms at
//! `min(batch, FUSED_CHUNK)` and `batch % FUSED_CHUNK` images, dense or with sliced (strided)
//! views, as it does at the full batch with sliced views. At run time the actual (strided)
//! descriptors decide: the fastest timed algorithm that supports them and fits the workspace is
//! used (implicit GEMM, with no workspace, is the last resort), and a choice that cuDNN rejects
//! when run falls through to the next (an error path: such a fall-through is this executor's own).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cudnn::{result as cr, sys as cs};
use cudarc::driver::CudaStream;

use super::FUSED_CHUNK;
use crate::backend::{ConvShape, ConvSpec, View};
use crate::{bail, Error, Result};

/// Most workspace bytes one convolution algorithm may use.
const WORKSPACE_CAP: usize = 256 << 20;
/// Algorithms within this factor of the fastest one's time count as fast.
const NEAR_FASTEST: f32 = 1.10;
/// The workspace start is aligned to this many bytes (the slack is reserved too).
const ALIGN: usize = 256;

/// A convolution direction; its index into per-direction arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Dir {
    Forward = 0,
    Data = 1,
    Filter = 2,
}

/// cudnnConvolution{Fwd,BwdData,BwdFilter}AlgoPerf_t with the enums as plain integers, so a
/// value this cudarc does not know is not undefined behaviour (the three share one layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Perf {
    algo: u32,
    status: u32,
    time: f32,
    memory: usize,
    determinism: u32,
    math: u32,
    reserved: [c_int; 3],
}

/// A convolution as cuDNN sees it when run: per-image shape, batch, and the views' strides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Geometry {
    shape: ConvShape,
    n: usize,
    x_stride: usize,
    y_stride: usize,
}

/// Descriptors of one geometry, and the algorithm choice per direction once made.
struct Plan {
    x: Tensor,
    y: Tensor,
    w: Filter,
    conv: Conv,
    algos: [Option<Choice>; 3],
}

/// The usable (algorithm, workspace bytes) of one direction for one geometry, in order of
/// preference, and the index of the one in use.
struct Choice {
    usable: Vec<(u32, usize)>,
    current: usize,
}

/// cudnnFind's results, fastest first (usable ones only), per (device ordinal, shape, planned
/// batch, direction): shared by every executor of the process, so that they all choose alike.
type Rankings = HashMap<(usize, ConvShape, usize, Dir), Arc<[Perf]>>;

/// The process-wide [`Rankings`].
fn rankings() -> &'static Mutex<Rankings> {
    static RANKINGS: OnceLock<Mutex<Rankings>> = OnceLock::new();
    RANKINGS.get_or_init(Default::default)
}

/// The cuDNN side of a [`GpuExec`](super::GpuExec).
pub(super) struct Convs {
    handle: cs::cudnnHandle_t,
    /// The device's ordinal (the process-wide rankings are per device).
    ordinal: usize,
    /// Aligned device address of the workspace in the arena, and the bytes algorithms may use:
    /// the reserved bytes less the alignment slack [`Convs::plan`] added, so that it does not
    /// depend on where the arena lies.
    workspace: (u64, usize),
    /// The process-wide rankings of the last planned batch, per shape and direction.
    ranked: HashMap<(ConvShape, Dir), Arc<[Perf]>>,
    plans: HashMap<Geometry, Plan>,
}

/// Checks that cuDNN 9 can be loaded, with its convolution sub-library; returns its version
/// (`major * 10000 + minor * 100 + patch`).
pub(super) fn preflight() -> Result<usize> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cs::is_culib_present() } {
        bail!(
            "cuDNN 9 not found (libcudnn.so.9): pip install nvidia-cudnn-cu13 and add its nvidia/cudnn/lib folder to \
             LD_LIBRARY_PATH, or use --device cpu"
        );
    }
    let v = cr::get_version();
    if v < 90000 {
        bail!("cuDNN {v} is older than 9: install cuDNN 9 (pip install nvidia-cudnn-cu13), or use --device cpu");
    }
    // SAFETY: version queries; they load the sub-libraries.
    let sub = unsafe { cs::cudnnOpsVersionCheck().result().and_then(|_| cs::cudnnCnnVersionCheck().result()) };
    if let Err(e) = sub {
        bail!(
            "cuDNN {}.{}: the convolution sub-libraries (libcudnn_cnn.so.9, libcudnn_ops.so.9) did not load ({:?}): \
             reinstall cuDNN with all its libraries in one folder on LD_LIBRARY_PATH",
            v / 10000,
            v / 100 % 100,
            e.0
        );
    }
    Ok(v)
}

impl Convs {
    /// A cuDNN handle on `stream` of device `ordinal` (the context must be current).
    pub(super) fn new(stream: &CudaStream, ordinal: usize) -> Result<Convs> {
        let handle = cr::create_handle().map_err(|e| err(format!("cuDNN failed to start ({:?})", e.0)))?;
        let convs = Convs { handle, ordinal, workspace: (0, 0), ranked: HashMap::new(), plans: HashMap::new() };
        // SAFETY: both handles are valid; the stream outlives the handle (GpuExec's field order).
        unsafe { cr::set_stream(handle, stream.cu_stream() as cs::cudaStream_t) }
            .map_err(|e| status("cudnnSetStream", e))?;
        Ok(convs)
    }

    /// Times the algorithms of every distinct shape in `convs` at `batch` images (or takes the
    /// process-wide rankings) and returns the workspace bytes to reserve (alignment slack
    /// included).
    pub(super) fn plan(&mut self, convs: &[ConvShape], batch: usize) -> Result<usize> {
        let mut need = 0;
        for (i, &shape) in convs.iter().enumerate() {
            if batch == 0 || convs[..i].contains(&shape) {
                continue;
            }
            let k = shape.spec.k;
            if shape.spec.stride == 0 || k == 0 || shape.h + 2 * shape.spec.pad < k || shape.w + 2 * shape.spec.pad < k
            {
                bail!("invalid convolution {shape:?}");
            }
            let (oh, ow) = (shape.spec.out(shape.h), shape.spec.out(shape.w));
            let (x_dense, y_dense) = (shape.cin * shape.h * shape.w, shape.cout * oh * ow);
            let g = Geometry { shape, n: batch, x_stride: x_dense, y_stride: y_dense };
            // At run time the views are mostly channel slices (CHW-packed, a larger image stride),
            // whose workspace can differ from the dense tensors' that cudnnFind times, and fused
            // convolutions run FUSED_CHUNK images at a time (the last chunk `batch % FUSED_CHUNK`)
            // from the dense scratch into sliced views: reserve the fallback algorithms' workspace
            // for all of these, each side dense or sliced, so that one of them always fits. One
            // image is described as dense (see `run`).
            let mut others = Vec::new();
            let mut counts = vec![batch, FUSED_CHUNK.min(batch), batch % FUSED_CHUNK];
            counts.dedup();
            for n in counts.into_iter().filter(|&n| n > 0) {
                let sliced: &[usize] = if n > 1 { &[0, 1] } else { &[0] };
                for (&dx, &dy) in sliced.iter().flat_map(|dx| sliced.iter().map(move |dy| (dx, dy))) {
                    let other = Geometry { shape, n, x_stride: x_dense + dx, y_stride: y_dense + dy };
                    if other != g {
                        others.push(Plan::new(other)?);
                    }
                }
            }
            let handle = self.handle;
            let plan = match self.plans.entry(g) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(Plan::new(g)?),
            };
            for dir in [Dir::Forward, Dir::Data, Dir::Filter] {
                let fallback = |p: &Plan| fallbacks(dir).iter().find_map(|&a| workspace_size(handle, p, dir, a).ok());
                let ranked = {
                    // Held while timing: one executor times a shape, the others wait and share it.
                    let mut all = rankings().lock().unwrap_or_else(|p| p.into_inner());
                    match all.entry((self.ordinal, shape, batch, dir)) {
                        Entry::Occupied(e) => e.get().clone(),
                        Entry::Vacant(e) => {
                            let found = find(handle, plan, dir).map_err(|e| {
                                err(format!(
                                    "cuDNN could not time the {dir:?} convolution algorithms for {shape:?} at batch \
                                     {batch} ({:?})",
                                    e.0
                                ))
                            })?;
                            e.insert(found.into()).clone()
                        }
                    }
                };
                let reserve = match frugal(&ranked) {
                    Some(p) => p.memory,
                    None => fallback(plan).unwrap_or(0),
                };
                let others_reserve = others.iter().filter_map(fallback).max().unwrap_or(0);
                need = need.max(reserve).max(others_reserve);
                self.ranked.insert((shape, dir), ranked);
            }
        }
        Ok(if need > 0 { need + ALIGN } else { 0 })
    }

    /// The workspace region of the arena: `bytes` at device address `ptr`. Algorithms may use
    /// `bytes` less [`ALIGN`] from the aligned start (the slack `plan` added), whatever the
    /// alignment of `ptr`, so that the choices depend only on the workspace size.
    pub(super) fn set_workspace(&mut self, ptr: u64, bytes: usize) {
        let aligned = ptr.next_multiple_of(ALIGN as u64);
        self.workspace = (aligned, bytes.saturating_sub(ALIGN));
        for plan in self.plans.values_mut() {
            plan.algos = [None, None, None];
        }
    }

    /// `y = conv(x, w)` at device addresses `px`, `pw`, `py`.
    pub(super) fn forward(&mut self, x: View, px: u64, pw: u64, y: View, py: u64, spec: ConvSpec) -> Result<()> {
        self.run(Dir::Forward, x, px, pw, y, py, spec, 0.0)
    }

    /// `gx = conv_transpose(gy, w)`.
    pub(super) fn backward_data(
        &mut self,
        gx: View,
        px: u64,
        pw: u64,
        gy: View,
        py: u64,
        spec: ConvSpec,
    ) -> Result<()> {
        self.run(Dir::Data, gx, px, pw, gy, py, spec, 0.0)
    }

    /// `gw = dL/dw`, or `gw += dL/dw` when `accumulate`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_filter(
        &mut self,
        x: View,
        px: u64,
        pw: u64,
        gy: View,
        py: u64,
        spec: ConvSpec,
        accumulate: bool,
    ) -> Result<()> {
        self.run(Dir::Filter, x, px, pw, gy, py, spec, if accumulate { 1.0 } else { 0.0 })
    }

    /// One convolution call in direction `dir`; `x` is the input side (x or gx), `y` the output
    /// side (y or gy), `pw` the filter (w or gw); the output is scaled by `beta` and added to.
    #[allow(clippy::too_many_arguments)]
    fn run(&mut self, dir: Dir, x: View, px: u64, pw: u64, y: View, py: u64, spec: ConvSpec, beta: f32) -> Result<()> {
        if x.n == 0 || x.c == 0 || y.c == 0 {
            return Ok(());
        }
        let shape = ConvShape { spec, cin: x.c, cout: y.c, h: x.h, w: x.w };
        // One image: its stride is meaningless (and may be anything), so describe it as dense.
        let stride = |v: View| if v.n > 1 { v.img_stride } else { v.c * v.h * v.w };
        let g = Geometry { shape, n: x.n, x_stride: stride(x), y_stride: stride(y) };
        let plan = match self.plans.entry(g) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Plan::new(g)?),
        };
        let (handle, (ws, ws_bytes)) = (self.handle, self.workspace);
        if plan.algos[dir as usize].is_none() {
            let mut order: Vec<u32> =
                self.ranked.get(&(shape, dir)).map_or(Vec::new(), |r| r.iter().map(|p| p.algo).collect());
            for &a in fallbacks(dir) {
                if !order.contains(&a) {
                    order.push(a);
                }
            }
            let usable: Vec<(u32, usize)> = order
                .into_iter()
                .filter_map(|a| workspace_size(handle, plan, dir, a).ok().filter(|&b| b <= ws_bytes).map(|b| (a, b)))
                .collect();
            if usable.is_empty() {
                bail!(
                    "no cuDNN {dir:?} convolution algorithm for {shape:?} at batch {} (image strides {}, {}) fits the \
                     {ws_bytes}-byte workspace",
                    g.n,
                    g.x_stride,
                    g.y_stride
                );
            }
            plan.algos[dir as usize] = Some(Choice { usable, current: 0 });
        }
        let Plan { x: xd, y: yd, w: wd, conv, algos } = plan;
        let Some(choice) = &mut algos[dir as usize] else { bail!("no cuDNN algorithm chosen") };
        let mut first_error = None;
        for (i, &(algo, bytes)) in choice.usable.iter().enumerate().skip(choice.current) {
            let wsp = if bytes > 0 { ws as usize as *mut c_void } else { std::ptr::null_mut() };
            match execute(handle, xd, yd, wd, conv, dir, algo, (px, pw, py), (wsp, bytes), beta) {
                Ok(()) => {
                    choice.current = i;
                    return Ok(());
                }
                Err(e) => {
                    first_error.get_or_insert((algo, e));
                }
            }
        }
        match first_error {
            Some((algo, e)) => {
                bail!("cuDNN {dir:?} convolution (algorithm {algo}) of {shape:?} at batch {} failed: {:?}", g.n, e.0)
            }
            None => bail!("cuDNN {dir:?} convolution of {shape:?}: no algorithm left to try"),
        }
    }
}

impl Drop for Convs {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { cr::destroy_handle(self.handle) };
    }
}

impl Plan {
    /// Descriptors for `g`.
    fn new(g: Geometry) -> Result<Plan> {
        let s = g.shape;
        let (oh, ow) = (s.spec.out(s.h), s.spec.out(s.w));
        Ok(Plan {
            x: Tensor::new([g.n, s.cin, s.h, s.w], g.x_stride)?,
            y: Tensor::new([g.n, s.cout, oh, ow], g.y_stride)?,
            w: Filter::new([s.cout, s.cin, s.spec.k, s.spec.k])?,
            conv: Conv::new(s.spec)?,
            algos: [None, None, None],
        })
    }
}

/// A float tensor descriptor [n, c, h, w] with strides (image stride, h*w, w, 1).
struct Tensor(cs::cudnnTensorDescriptor_t);

impl Tensor {
    fn new(dims: [usize; 4], img_stride: usize) -> Result<Tensor> {
        let t = Tensor(cr::create_tensor_descriptor().map_err(|e| status("cudnnCreateTensorDescriptor", e))?);
        let [n, c, h, w] = dims;
        let dims = [int(n)?, int(c)?, int(h)?, int(w)?];
        let strides = [int(img_stride)?, int(h * w)?, int(w)?, 1];
        // SAFETY: `t.0` is a live descriptor.
        unsafe { cr::set_tensor4d_descriptor_ex(t.0, cs::cudnnDataType_t::CUDNN_DATA_FLOAT, dims, strides) }
            .map_err(|e| status("cudnnSetTensor4dDescriptorEx", e))?;
        Ok(t)
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { cr::destroy_tensor_descriptor(self.0) };
    }
}

/// A float filter descriptor [cout, cin, k, k].
struct Filter(cs::cudnnFilterDescriptor_t);

impl Filter {
    fn new(dims: [usize; 4]) -> Result<Filter> {
        let f = Filter(cr::create_filter_descriptor().map_err(|e| status("cudnnCreateFilterDescriptor", e))?);
        let dims = [int(dims[0])?, int(dims[1])?, int(dims[2])?, int(dims[3])?];
        // SAFETY: `f.0` is a live descriptor.
        unsafe {
            cr::set_filter4d_descriptor(
                f.0,
                cs::cudnnDataType_t::CUDNN_DATA_FLOAT,
                cs::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                dims,
            )
        }
        .map_err(|e| status("cudnnSetFilter4dDescriptor", e))?;
        Ok(f)
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { cr::destroy_filter_descriptor(self.0) };
    }
}

/// A cross-correlation descriptor with f32 compute and FMA math (no TF32).
struct Conv(cs::cudnnConvolutionDescriptor_t);

impl Conv {
    fn new(spec: ConvSpec) -> Result<Conv> {
        let c = Conv(cr::create_convolution_descriptor().map_err(|e| status("cudnnCreateConvolutionDescriptor", e))?);
        let (pad, stride) = (int(spec.pad)?, int(spec.stride)?);
        // SAFETY: `c.0` is a live descriptor.
        unsafe {
            cr::set_convolution2d_descriptor(
                c.0,
                pad,
                pad,
                stride,
                stride,
                1,
                1,
                cs::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                cs::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(|e| status("cudnnSetConvolution2dDescriptor", e))?;
            cr::set_convolution_math_type(c.0, cs::cudnnMathType_t::CUDNN_FMA_MATH)
                .map_err(|e| status("cudnnSetConvolutionMathType", e))?;
        }
        Ok(c)
    }
}

impl Drop for Conv {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { cr::destroy_convolution_descriptor(self.0) };
    }
}

/// cudnnFind for one direction: the deterministic FMA algorithms that succeeded within the
/// workspace cap, fastest first.
fn find(handle: cs::cudnnHandle_t, p: &Plan, dir: Dir) -> std::result::Result<Vec<Perf>, cr::CudnnError> {
    let mut perf = [Perf::default(); 8];
    let mut count: c_int = 0;
    let requested = algo_count(dir) as c_int;
    // SAFETY: descriptors are live; `perf` has room for `requested` entries of the layout cuDNN
    // writes (see `Perf`); cuDNN allocates and frees its own buffers.
    unsafe {
        match dir {
            Dir::Forward => cs::cudnnFindConvolutionForwardAlgorithm(
                handle,
                p.x.0,
                p.w.0,
                p.conv.0,
                p.y.0,
                requested,
                &mut count,
                perf.as_mut_ptr().cast(),
            ),
            Dir::Data => cs::cudnnFindConvolutionBackwardDataAlgorithm(
                handle,
                p.w.0,
                p.y.0,
                p.conv.0,
                p.x.0,
                requested,
                &mut count,
                perf.as_mut_ptr().cast(),
            ),
            Dir::Filter => cs::cudnnFindConvolutionBackwardFilterAlgorithm(
                handle,
                p.x.0,
                p.y.0,
                p.conv.0,
                p.w.0,
                requested,
                &mut count,
                perf.as_mut_ptr().cast(),
            ),
        }
        .result()?;
    }
    let mut ok: Vec<Perf> = perf[..count.clamp(0, requested) as usize]
        .iter()
        .filter(|p| {
            p.status == 0
                && p.determinism == cs::cudnnDeterminism_t::CUDNN_DETERMINISTIC as u32
                && (p.math == cs::cudnnMathType_t::CUDNN_DEFAULT_MATH as u32
                    || p.math == cs::cudnnMathType_t::CUDNN_FMA_MATH as u32)
                && p.memory <= WORKSPACE_CAP
                && p.algo < algo_count(dir)
                && p.time.is_finite()
                && p.time >= 0.0
        })
        .copied()
        .collect();
    ok.sort_by(|a, b| a.time.total_cmp(&b.time));
    Ok(ok)
}

/// Among algorithms within [`NEAR_FASTEST`] of the fastest, the one with the smallest workspace.
fn frugal(ranked: &[Perf]) -> Option<&Perf> {
    let fastest = ranked.first()?.time;
    ranked.iter().filter(|p| p.time <= fastest * NEAR_FASTEST).min_by_key(|p| p.memory)
}

/// Deterministic algorithms tried when none of the timed ones applies (implicit GEMM first).
fn fallbacks(dir: Dir) -> &'static [u32] {
    match dir {
        Dir::Forward => &[0, 1],
        Dir::Data | Dir::Filter => &[1],
    }
}

/// Number of algorithms cuDNN has in direction `dir`.
fn algo_count(dir: Dir) -> u32 {
    match dir {
        Dir::Forward => cs::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as u32,
        Dir::Data => cs::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as u32,
        Dir::Filter => cs::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as u32,
    }
}

/// Workspace bytes algorithm `algo` needs for the plan's descriptors (an error when it does not
/// support them).
fn workspace_size(
    handle: cs::cudnnHandle_t,
    p: &Plan,
    dir: Dir,
    algo: u32,
) -> std::result::Result<usize, cr::CudnnError> {
    let bad = cr::CudnnError(cs::cudnnStatus_t::CUDNN_STATUS_BAD_PARAM);
    // SAFETY: descriptors are live; the algorithm values come from the enums' ranges.
    unsafe {
        match dir {
            Dir::Forward => cr::get_convolution_forward_workspace_size(
                handle,
                p.x.0,
                p.w.0,
                p.conv.0,
                p.y.0,
                fwd_algo(algo).ok_or(bad)?,
            ),
            Dir::Data => cr::get_convolution_backward_data_workspace_size(
                handle,
                p.w.0,
                p.y.0,
                p.conv.0,
                p.x.0,
                data_algo(algo).ok_or(bad)?,
            ),
            Dir::Filter => cr::get_convolution_backward_filter_workspace_size(
                handle,
                p.x.0,
                p.y.0,
                p.conv.0,
                p.w.0,
                filter_algo(algo).ok_or(bad)?,
            ),
        }
    }
}

/// Runs one convolution: `(px, pw, py)` are the input-side, filter and output-side addresses.
#[allow(clippy::too_many_arguments)]
fn execute(
    handle: cs::cudnnHandle_t,
    x: &Tensor,
    y: &Tensor,
    w: &Filter,
    conv: &Conv,
    dir: Dir,
    algo: u32,
    (px, pw, py): (u64, u64, u64),
    (ws, ws_bytes): (*mut c_void, usize),
    beta: f32,
) -> std::result::Result<(), cr::CudnnError> {
    let alpha = 1.0f32;
    let (a, b) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
    let (px, pw, py) = (px as usize as *mut c_void, pw as usize as *mut c_void, py as usize as *mut c_void);
    let bad = cr::CudnnError(cs::cudnnStatus_t::CUDNN_STATUS_BAD_PARAM);
    // SAFETY: descriptors are live and describe the views at these arena addresses (checked by
    // the caller); the workspace holds `ws_bytes`; alpha/beta outlive the (host-side) call.
    unsafe {
        match dir {
            Dir::Forward => cr::convolution_forward(
                handle,
                a,
                x.0,
                px,
                w.0,
                pw,
                conv.0,
                fwd_algo(algo).ok_or(bad)?,
                ws,
                ws_bytes,
                b,
                y.0,
                py,
            ),
            Dir::Data => cr::convolution_backward_data(
                handle,
                a,
                w.0,
                pw,
                y.0,
                py,
                conv.0,
                data_algo(algo).ok_or(bad)?,
                ws,
                ws_bytes,
                b,
                x.0,
                px,
            ),
            Dir::Filter => cr::convolution_backward_filter(
                handle,
                a,
                x.0,
                px,
                y.0,
                py,
                conv.0,
                filter_algo(algo).ok_or(bad)?,
                ws,
                ws_bytes,
                b,
                w.0,
                pw,
            ),
        }
    }
}

fn fwd_algo(a: u32) -> Option<cs::cudnnConvolutionFwdAlgo_t> {
    use cs::cudnnConvolutionFwdAlgo_t::*;
    Some(match a {
        0 => CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        1 => CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        2 => CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        3 => CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        4 => CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        5 => CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        6 => CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        7 => CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        _ => return None,
    })
}

fn data_algo(a: u32) -> Option<cs::cudnnConvolutionBwdDataAlgo_t> {
    use cs::cudnnConvolutionBwdDataAlgo_t::*;
    Some(match a {
        0 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        1 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        2 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        3 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        4 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        5 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
        _ => return None,
    })
}

fn filter_algo(a: u32) -> Option<cs::cudnnConvolutionBwdFilterAlgo_t> {
    use cs::cudnnConvolutionBwdFilterAlgo_t::*;
    Some(match a {
        0 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        1 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        2 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        3 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        4 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
        5 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        6 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
        _ => return None,
    })
}

/// `v` as a C int for a descriptor.
fn int(v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| err(format!("a convolution dimension or stride ({v}) is too large for cuDNN")))
}

fn err(msg: String) -> Error {
    Error(msg)
}

fn status(what: &str, e: cr::CudnnError) -> Error {
    err(format!("{what} failed: {:?}", e.0))
}
