//! cuDNN convolutions of [`GpuExec`](super::GpuExec), through cudarc's `result`/`sys` layers
//! (the safe layer has no strided descriptors over raw addresses).
//!
//! Reproducibility: within a process, results are bitwise reproducible. Math is FMA (no TF32),
//! only deterministic algorithms are used, and the algorithm choices are the same for every
//! executor of the process on the same GPU: cudnnFind's rankings are kept in a process-wide
//! cache (keyed by device ordinal, rules, shape, planned batch and direction), and the choice
//! for a geometry is a deterministic function of that ranking and of the geometry
//! (`algos::preference`). Across processes cuDNN's timings may rank the algorithms differently,
//! so the last bits could differ; a resumed run reuses the rankings its run recorded
//! ([`Convs::record`], [`Convs::reuse`]), so it chooses the same algorithms and is exact.
//!
//! Views are channel slices of larger NCHW buffers, so every tensor descriptor carries explicit
//! strides (image stride, h*w, w, 1).
//!
//! Algorithms: [`Convs::plan`] ranks every algorithm once per convolution shape, planned batch
//! and direction with cudnnFind (on dense tensors of the full planned batch; it allocates its
//! own buffers, since it runs before the arena exists), keeping only what will run (`algos`:
//! deterministic, timed with FMA math, within the workspace cap, each algorithm once, and only
//! GEMM-based ones under `DENSENET_CUDNN_ALGOS=gemm`). It then chooses for every geometry the
//! shape will run at: the full batch and, for fused convolutions (a BN-ReLU applied into a
//! scratch first, [`super::FUSED_CHUNK`] images at a time, filter gradients accumulating with
//! beta = 1), the chunks, each side dense or a channel slice; and it reserves the largest
//! workspace those choices need. At run time the actual (strided) descriptors decide: a planned
//! geometry runs its choice; one not foreseen (a partial last batch) is chosen the same way, and
//! if that choice does not fit the workspace the next that does runs, with a warning (implicit
//! GEMM, with no workspace, is the last resort); a choice cuDNN rejects when run falls through to
//! the next (an error path: such a fall-through is this executor's own).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cudnn::{result as cr, sys as cs};
use cudarc::driver::CudaStream;

use super::algos::{self, AlgorithmFamily, Dir, Header, Math, Perf, Ranked};
use super::FUSED_CHUNK;
use crate::backend::{ConvShape, ConvSpec, View};
use crate::{bail, Error, Result};

/// Whether a ranking with no usable result has been reported (once per process).
static EMPTY_RANKING_TOLD: AtomicBool = AtomicBool::new(false);

/// The workspace start is aligned to this many bytes (the slack is reserved too).
const ALIGN: usize = 256;
/// cudnnFind is asked for at least this many results per algorithm (one per math type it
/// may try), when cuDNN cannot say how many it returns at most.
const MIN_FIND_RESULTS_PER_ALGO: c_int = 4;

/// A convolution as cuDNN sees it when run: per-image shape, batch, and the views' strides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Geometry {
    shape: ConvShape,
    n: usize,
    x_stride: usize,
    y_stride: usize,
}

/// Descriptors of one geometry, the order of preference per direction planned for it, and
/// the algorithms usable in the workspace once the first call chose.
struct Plan {
    x: Tensor,
    y: Tensor,
    w: Filter,
    conv: Conv,
    preferred: [Option<Vec<(u32, usize, f32)>>; 3],
    algos: [Option<Choice>; 3],
}

/// The usable (algorithm, workspace bytes) of one direction for one geometry, in order of
/// preference, and the index of the one in use.
struct Choice {
    usable: Vec<(u32, usize)>,
    current: usize,
}

/// A ranking planned with: the planned batch it was made at, and the ranking.
type Planned = (usize, Arc<[Ranked]>);

/// What a ranking is for: device ordinal, the rules it was made under, shape, planned batch
/// and direction.
type RankingKey = (usize, AlgorithmFamily, Math, ConvShape, usize, Dir);

/// cudnnFind's rankings ([`algos::rank`]), shared by every executor of the process, so that
/// they all choose alike, and filled from a run's record when one is reused.
fn rankings() -> &'static Mutex<HashMap<RankingKey, Arc<[Ranked]>>> {
    static RANKINGS: OnceLock<Mutex<HashMap<RankingKey, Arc<[Ranked]>>>> = OnceLock::new();
    RANKINGS.get_or_init(Default::default)
}

/// The cuDNN side of a [`GpuExec`](super::GpuExec).
pub(super) struct Convs {
    handle: cs::cudnnHandle_t,
    /// The device's ordinal (the process-wide rankings are per device).
    ordinal: usize,
    /// The GPU, cuDNN and rules the rankings are made for (the record's header).
    header: Header,
    /// Aligned device address of the workspace in the arena, and the bytes algorithms may use:
    /// the reserved bytes less the alignment slack [`Convs::plan`] added, so that it does not
    /// depend on where the arena lies.
    workspace: (u64, usize),
    /// The rankings of the last planned batch (which it is, and the ranking), per shape and
    /// direction.
    ranked: HashMap<(ConvShape, Dir), Planned>,
    plans: HashMap<Geometry, Plan>,
    /// How many cudnnFind calls this executor made.
    finds: usize,
    /// Geometries already warned about (their choice did not fit the workspace).
    warned: HashSet<(Geometry, Dir)>,
}

/// The cuDNN a process loaded: its version and the CUDA version it was built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Loaded {
    /// `major * 10000 + minor * 100 + patch` (`cudnnGetVersion`).
    pub version: usize,
    /// The CUDA runtime it was built for, as `1000 * major + 10 * minor`
    /// (`cudnnGetCudartVersion`); it decides which cuBLASLt and NVRTC go with it.
    pub cuda: usize,
    /// The cuBLASLt loaded with it, `major * 10000 + minor * 100 + patch`
    /// (`cublasLtGetVersion`; 0 if it does not say).
    pub cublaslt: usize,
}

impl Loaded {
    /// `9.13.0`.
    pub fn version_text(&self) -> String {
        dotted(self.version)
    }

    /// cuBLASLt's version, `13.0.1`.
    pub fn cublaslt_text(&self) -> String {
        dotted(self.cublaslt)
    }

    /// The major version of the CUDA libraries that go with this cuDNN (13 for CUDA 13.x).
    pub fn cuda_major(&self) -> usize {
        self.cuda / 1000
    }
}

/// Checks that cuDNN 9 can be loaded, with its convolution sub-library and the cuBLASLt its
/// legacy convolution path loads at run time (of the CUDA major version cuDNN was built for).
pub(super) fn preflight() -> Result<Loaded> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cs::is_culib_present() } {
        bail!(
            "cuDNN 9 not found (libcudnn.so.9): pip install nvidia-cudnn-cu13 and add its nvidia/cudnn/lib folder to \
             LD_LIBRARY_PATH, or use --device cpu"
        );
    }
    let v = cr::get_version();
    if v < 90000 {
        // cuDNN 8 counts its version as major * 1000 + minor * 100 + patch.
        let (major, minor, patch) = (v / 1000, v / 100 % 10, v % 100);
        bail!(
            "cuDNN {major}.{minor}.{patch} is older than 9: install cuDNN 9 (pip install nvidia-cudnn-cu13), or use \
             --device cpu"
        );
    }
    // SAFETY: a version query of the loaded library.
    let mut loaded = Loaded { version: v, cuda: unsafe { cs::cudnnGetCudartVersion() }, cublaslt: 0 };
    // SAFETY: version queries; they load the sub-libraries.
    let sub = unsafe { cs::cudnnOpsVersionCheck().result().and_then(|_| cs::cudnnCnnVersionCheck().result()) };
    if let Err(e) = sub {
        bail!(
            "cuDNN {}: the convolution sub-libraries (libcudnn_cnn.so.9, libcudnn_ops.so.9) did not load ({:?}): \
             reinstall cuDNN with all its libraries in one folder on LD_LIBRARY_PATH",
            loaded.version_text(),
            e.0
        );
    }
    let major = loaded.cuda_major();
    let cublaslt = format!("libcublasLt.so.{major}");
    // SAFETY: loads a library whose initialisers are sound (NVIDIA's cuBLASLt); cuDNN loads the
    // same one later, and the handle is kept for the life of the process.
    match unsafe { libloading::Library::new(&cublaslt) } {
        Ok(lib) => {
            // SAFETY: cuBLASLt's `size_t cublasLtGetVersion(void)`.
            let version = unsafe { lib.get::<unsafe extern "C" fn() -> usize>(b"cublasLtGetVersion\0") };
            // SAFETY: the symbol has that signature and the library stays loaded.
            loaded.cublaslt = version.map_or(0, |f| unsafe { f() });
            CUBLASLT.get_or_init(|| lib);
        }
        Err(e) => bail!(
            "{cublaslt} not found ({e}): cuDNN {} for CUDA {} loads it for its convolutions: pip install \
             nvidia-cublas{} and add the folder holding {cublaslt} to LD_LIBRARY_PATH, or use --device cpu",
            loaded.version_text(),
            super::ptx::cuda_text(loaded.cuda as u32),
            if major >= 13 { String::new() } else { format!("-cu{major}") },
        ),
    }
    Ok(loaded)
}

/// `major.minor.patch` of a version counted as `major * 10000 + minor * 100 + patch`.
fn dotted(v: usize) -> String {
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

/// cuBLASLt, loaded by [`preflight`] and kept loaded.
static CUBLASLT: OnceLock<libloading::Library> = OnceLock::new();

impl Convs {
    /// A cuDNN handle on `stream` of device `ordinal` (the context must be current), choosing
    /// algorithms under `header`'s rules.
    pub(super) fn new(stream: &CudaStream, ordinal: usize, header: Header) -> Result<Convs> {
        let handle = cr::create_handle().map_err(|e| err(format!("cuDNN failed to start ({:?})", e.0)))?;
        let convs = Convs {
            handle,
            ordinal,
            header,
            workspace: (0, 0),
            ranked: HashMap::new(),
            plans: HashMap::new(),
            finds: 0,
            warned: HashSet::new(),
        };
        // SAFETY: both handles are valid; the stream outlives the handle (GpuExec's field order).
        unsafe { cr::set_stream(handle, stream.cu_stream() as cs::cudaStream_t) }
            .map_err(|e| status("cudnnSetStream", e))?;
        Ok(convs)
    }

    /// Ranks the algorithms of every distinct shape in `convs` at `batch` images with
    /// cudnnFind (unless the process already has the ranking, from another executor or a
    /// reused record), chooses for each geometry that will run, and returns the workspace
    /// bytes to reserve (alignment slack included): the most any of those choices needs.
    ///
    /// The geometries are the full batch and the fused chunks ([`FUSED_CHUNK`] images, and the
    /// remainder `batch % FUSED_CHUNK`), each side dense or a channel slice of a larger buffer
    /// (a larger image stride). A geometry seen only when run (a partial last batch) is chosen
    /// for then, the same way; if its choice does not fit the workspace, the next that does
    /// runs, with a warning.
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
            let geometries = geometries(shape, batch);
            for &g in &geometries {
                if let Entry::Vacant(e) = self.plans.entry(g) {
                    e.insert(Plan::new(g)?);
                }
            }
            for dir in Dir::ALL {
                let ranked = self.ranking(shape, batch, geometries[0], dir)?;
                let (handle, family) = (self.handle, self.header.family);
                for g in &geometries {
                    let plan = self.plans.get_mut(g).expect("planned above");
                    let pref = algos::preference(&ranked, dir, family, |a| workspace_size(handle, plan, dir, a).ok());
                    need = need.max(pref.first().map_or(0, |p| p.1));
                    plan.preferred[dir as usize] = Some(pref);
                    plan.algos[dir as usize] = None;
                }
                self.ranked.insert((shape, dir), (batch, ranked));
            }
        }
        Ok(if need > 0 { need + ALIGN } else { 0 })
    }

    /// The ranking of `shape` at `batch` in direction `dir`: the process's, or cudnnFind's on
    /// the dense geometry `dense` (timed once per process; other executors wait and share it).
    fn ranking(&mut self, shape: ConvShape, batch: usize, dense: Geometry, dir: Dir) -> Result<Arc<[Ranked]>> {
        let key = (self.ordinal, self.header.family, self.header.math, shape, batch, dir);
        let mut all = rankings().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = all.get(&key) {
            return Ok(r.clone());
        }
        let plan = self.plans.get(&dense).expect("planned by the caller");
        let found = find(self.handle, plan, dir).map_err(|e| {
            err(format!(
                "cuDNN could not time the {dir} convolution algorithms for {shape:?} at batch {batch} ({:?})",
                e.0
            ))
        })?;
        self.finds += 1;
        let ranked: Arc<[Ranked]> = algos::rank(&found, dir, self.header.family, self.header.math).into();
        if ranked.is_empty() && !found.is_empty() && !EMPTY_RANKING_TOLD.swap(true, Ordering::Relaxed) {
            let seen: Vec<String> = found
                .iter()
                .map(|p| format!("algo {} status {} det {} math {}", p.algo, p.status, p.determinism, p.math))
                .collect();
            eprintln!(
                "warning: none of cudnnFind's {} results for the {dir} convolution {shape:?} at batch {batch} can run \
                 (deterministic, FMA math, {:?} algorithms): the fallback algorithms run instead (said once; seen: {})",
                found.len(),
                self.header.family,
                seen.join(", ")
            );
        }
        all.insert(key, ranked.clone());
        Ok(ranked)
    }

    /// How many cudnnFind calls this executor made (a reused record makes none).
    pub(super) fn finds(&self) -> usize {
        self.finds
    }

    /// The rankings this executor planned with, as a record a later process on the same GPU
    /// and cuDNN can reuse ([`Convs::reuse`]).
    pub(super) fn record(&self) -> String {
        let mut entries: Vec<algos::Entry> = self
            .ranked
            .iter()
            .map(|(&(shape, dir), (batch, r))| algos::Entry { shape, batch: *batch, dir, ranked: r.to_vec() })
            .collect();
        entries.sort_by_key(|e| {
            let s = e.shape;
            (e.dir as usize, s.spec.k, s.spec.stride, s.spec.pad, s.cin, s.cout, s.h, s.w, e.batch)
        });
        algos::record(&self.header, &entries)
    }

    /// Takes the rankings of a record written by [`Convs::record`] (before planning), so that
    /// they are not timed again and choose as they did; the number of rankings taken. A record
    /// made on another GPU, cuDNN or rules, or not well formed, is refused whole (the error
    /// says why), and planning times the algorithms as usual. Rankings the process already has
    /// are kept.
    pub(super) fn reuse(&mut self, text: &str) -> Result<usize> {
        let entries = algos::parse_record(text, &self.header)?;
        let mut all = rankings().lock().unwrap_or_else(|p| p.into_inner());
        let mut taken = 0;
        for e in entries {
            let key = (self.ordinal, self.header.family, self.header.math, e.shape, e.batch, e.dir);
            if let Entry::Vacant(v) = all.entry(key) {
                v.insert(e.ranked.into());
                taken += 1;
            }
        }
        Ok(taken)
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

    /// `y = conv(x, w)`; each view with its device address, `pw` the filter's.
    pub(super) fn forward(&mut self, x: (View, u64), pw: u64, y: (View, u64), spec: ConvSpec) -> Result<()> {
        self.run(Dir::Forward, x, pw, y, spec, 0.0)
    }

    /// `gx = conv_transpose(gy, w)`.
    pub(super) fn backward_data(&mut self, gx: (View, u64), pw: u64, gy: (View, u64), spec: ConvSpec) -> Result<()> {
        self.run(Dir::Data, gx, pw, gy, spec, 0.0)
    }

    /// `gw = dL/dw`, or `gw += dL/dw` when `accumulate`; `pw` is gw's address.
    pub(super) fn backward_filter(
        &mut self,
        x: (View, u64),
        pw: u64,
        gy: (View, u64),
        spec: ConvSpec,
        accumulate: bool,
    ) -> Result<()> {
        self.run(Dir::Filter, x, pw, gy, spec, if accumulate { 1.0 } else { 0.0 })
    }

    /// One convolution call in direction `dir`; `x` is the input side (x or gx), `y` the output
    /// side (y or gy), each with its device address, `pw` the filter (w or gw); the output is
    /// scaled by `beta` and added to.
    fn run(&mut self, dir: Dir, x: (View, u64), pw: u64, y: (View, u64), spec: ConvSpec, beta: f32) -> Result<()> {
        let ((x, px), (y, py)) = (x, y);
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
        let (handle, (ws, ws_bytes), family) = (self.handle, self.workspace, self.header.family);
        if plan.algos[dir as usize].is_none() {
            let pref = match &plan.preferred[dir as usize] {
                Some(p) => p.clone(),
                None => {
                    let ranked = self.ranked.get(&(shape, dir)).map_or(&[][..], |(_, r)| &r[..]);
                    algos::preference(ranked, dir, family, |a| workspace_size(handle, plan, dir, a).ok())
                }
            };
            if pref.is_empty() {
                bail!(
                    "cuDNN supports none of the ranked or fallback {dir} algorithms for {shape:?} at batch {} (image \
                     strides {}, {})",
                    g.n,
                    g.x_stride,
                    g.y_stride
                );
            }
            let usable: Vec<(u32, usize)> = pref.iter().filter(|p| p.1 <= ws_bytes).map(|p| (p.0, p.1)).collect();
            let Some(&(first, _)) = usable.first() else {
                bail!(
                    "no cuDNN {dir} convolution algorithm for {shape:?} at batch {} (image strides {}, {}) fits the \
                     {ws_bytes}-byte workspace",
                    g.n,
                    g.x_stride,
                    g.y_stride
                );
            };
            if first != pref[0].0 && self.warned.insert((g, dir)) {
                eprintln!(
                    "warning: cuDNN {dir} convolution {shape:?} at batch {} (image strides {}, {}) runs algorithm \
                     {first}, not its choice {}, which needs {} bytes of workspace ({ws_bytes} reserved)",
                    g.n, g.x_stride, g.y_stride, pref[0].0, pref[0].1
                );
            }
            plan.algos[dir as usize] = Some(Choice { usable, current: 0 });
        }
        let Plan { x: xd, y: yd, w: wd, conv, algos, .. } = plan;
        let Some(choice) = &mut algos[dir as usize] else { bail!("no cuDNN algorithm chosen") };
        let mut first_error: Option<(u32, cr::CudnnError)> = None;
        for (i, &(algo, bytes)) in choice.usable.iter().enumerate().skip(choice.current) {
            let wsp = if bytes > 0 { ws as usize as *mut c_void } else { std::ptr::null_mut() };
            match execute(handle, (xd, yd, wd, conv), dir, algo, (px, pw, py), (wsp, bytes), beta) {
                Ok(()) => {
                    if let Some((refused, e)) = &first_error {
                        eprintln!(
                            "warning: cuDNN refused {dir} algorithm {refused} for {shape:?} at batch {} ({:?}): \
                             algorithm {algo} runs instead from now on",
                            g.n, e.0
                        );
                    }
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
                bail!("cuDNN {dir} convolution (algorithm {algo}) of {shape:?} at batch {} failed: {:?}", g.n, e.0)
            }
            None => bail!("cuDNN {dir} convolution of {shape:?}: no algorithm left to try"),
        }
    }
}

/// The geometries a shape runs at when planned for `batch`: the dense full batch first (the
/// one cudnnFind times), then the full batch and the fused chunks (`FUSED_CHUNK` images and
/// the remainder), each side dense or a channel slice (one more channel's plane in the image
/// stride, aligned as a real slice is); one image only dense.
fn geometries(shape: ConvShape, batch: usize) -> Vec<Geometry> {
    let (oh, ow) = (shape.spec.out(shape.h), shape.spec.out(shape.w));
    let (x_dense, y_dense) = (shape.cin * shape.h * shape.w, shape.cout * oh * ow);
    let mut out = vec![Geometry { shape, n: batch, x_stride: x_dense, y_stride: y_dense }];
    let mut counts = vec![batch, FUSED_CHUNK.min(batch), batch % FUSED_CHUNK];
    counts.dedup();
    for n in counts.into_iter().filter(|&n| n > 0) {
        let sliced: &[bool] = if n > 1 { &[false, true] } else { &[false] };
        for &sx in sliced {
            for &sy in sliced {
                let x_stride = x_dense + if sx { shape.h * shape.w } else { 0 };
                let y_stride = y_dense + if sy { oh * ow } else { 0 };
                let g = Geometry { shape, n, x_stride, y_stride };
                if !out.contains(&g) {
                    out.push(g);
                }
            }
        }
    }
    out
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
            preferred: [None, None, None],
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

/// cudnnFind for one direction, every result cuDNN reports (as many as it can return, so that
/// an FMA entry is never pushed out by the other math types' entries).
fn find(handle: cs::cudnnHandle_t, p: &Plan, dir: Dir) -> std::result::Result<Vec<Perf>, cr::CudnnError> {
    let mut max: c_int = 0;
    // SAFETY: the handle is live; the call writes one int.
    let counted = unsafe {
        match dir {
            Dir::Forward => cs::cudnnGetConvolutionForwardAlgorithmMaxCount(handle, &mut max),
            Dir::Data => cs::cudnnGetConvolutionBackwardDataAlgorithmMaxCount(handle, &mut max),
            Dir::Filter => cs::cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(handle, &mut max),
        }
        .result()
    };
    let requested = if counted.is_ok() { max } else { 0 }.max(MIN_FIND_RESULTS_PER_ALGO * dir.algo_count() as c_int);
    let mut perf = vec![Perf::default(); requested as usize];
    let mut count: c_int = 0;
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
    perf.truncate(count.clamp(0, requested) as usize);
    Ok(perf)
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

/// Runs one convolution: `(x, y, w, conv)` are the descriptors, `(px, pw, py)` the input-side,
/// filter and output-side addresses.
fn execute(
    handle: cs::cudnnHandle_t,
    (x, y, w, conv): (&Tensor, &Tensor, &Filter, &Conv),
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
