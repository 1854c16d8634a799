//! [`Convs`], the cuDNN side of a [`GpuExec`](crate::backend::cuda::GpuExec): its handle, and
//! the algorithm policy: which algorithm runs each convolution geometry, ranked by cudnnFind
//! once per process, and the record that lets a later process choose the same.
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
//! Algorithms: [`Convs::plan`] ranks every algorithm once per convolution shape, planned batch
//! and direction with cudnnFind (on dense tensors of the full planned batch; it allocates its
//! own buffers, since it runs before the arena exists), keeping only what will run (`algos`:
//! deterministic, timed with FMA math, within the workspace cap, each algorithm once, and only
//! GEMM-based ones under `DENSENET_CUDNN_ALGOS=gemm`). It then chooses for every geometry the
//! shape will run at: the full batch and, for fused convolutions (a BN-ReLU applied into a
//! scratch first, [`FUSED_CHUNK`] images at a time, filter gradients accumulating with
//! beta = 1), the chunks, each side dense or a channel slice; and it reserves the largest
//! workspace those choices need. At run time the actual (strided) descriptors decide: a planned
//! geometry runs its choice; one not foreseen (a partial last batch) is chosen the same way, and
//! if that choice does not fit the workspace the next that does runs, with a warning (implicit
//! GEMM, with no workspace, is the last resort); a choice cuDNN rejects when run falls through to
//! the next (an error path: such a fall-through is this executor's own).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cudnn::{result as cr, sys as cs};
use cudarc::driver::CudaStream;

use super::calls::{execute, find, workspace_size};
use super::cudnn_failed;
use super::descriptor::{Descriptors, Geometry};
use crate::backend::cuda::algos::{self, AlgorithmFamily, Dir, Header, Math, Ranked};
use crate::backend::cuda::FUSED_CHUNK;
use crate::backend::{ConvShape, ConvSpec, View};
use crate::{bail, Error, Result};

/// Whether a ranking with no usable result has been reported (once per process).
static EMPTY_RANKING_TOLD: AtomicBool = AtomicBool::new(false);

/// The workspace start is aligned to this many bytes (the slack is reserved too): what
/// `cudaMalloc` guarantees, so the workspace is aligned as one cuDNN allocated itself would be.
const WORKSPACE_ALIGN: usize = 256;

/// Descriptors of one geometry, the order of preference per direction planned for it, and
/// the algorithms usable in the workspace once the first call chose.
struct Plan {
    desc: Descriptors,
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

/// The cuDNN side of a [`GpuExec`](crate::backend::cuda::GpuExec).
pub(crate) struct Convs {
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

impl Convs {
    /// A cuDNN handle on `stream` of device `ordinal` (the context must be current), choosing
    /// algorithms under `header`'s rules.
    pub(crate) fn new(stream: &CudaStream, ordinal: usize, header: Header) -> Result<Convs> {
        let handle = cr::create_handle().map_err(|e| Error(format!("cuDNN failed to start ({:?})", e.0)))?;
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
            .map_err(|e| cudnn_failed("cudnnSetStream", e))?;
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
    pub(crate) fn plan(&mut self, convs: &[ConvShape], batch: usize) -> Result<usize> {
        let mut need = 0;
        for (i, &shape) in convs.iter().enumerate() {
            if batch == 0 || convs[..i].contains(&shape) {
                continue;
            }
            if !algos::is_convolution(shape.spec, shape.h, shape.w) {
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
                    let pref =
                        algos::preference(&ranked, dir, family, |a| workspace_size(handle, &plan.desc, dir, a).ok());
                    need = need.max(pref.first().map_or(0, |p| p.1));
                    plan.preferred[dir as usize] = Some(pref);
                    plan.algos[dir as usize] = None;
                }
                self.ranked.insert((shape, dir), (batch, ranked));
            }
        }
        Ok(if need > 0 { need + WORKSPACE_ALIGN } else { 0 })
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
        let found = find(self.handle, &plan.desc, dir).map_err(|e| {
            Error(format!(
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
            log::warn!(
                "none of cudnnFind's {} results for the {dir} convolution {shape:?} at batch {batch} can run \
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
    pub(crate) fn finds(&self) -> usize {
        self.finds
    }

    /// The rankings this executor planned with, as a record a later process on the same GPU
    /// and cuDNN can reuse ([`Convs::reuse`]).
    pub(crate) fn record(&self) -> String {
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
    pub(crate) fn reuse(&mut self, text: &str) -> Result<usize> {
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
    /// `bytes` less [`WORKSPACE_ALIGN`] from the aligned start (the slack `plan` added),
    /// whatever the alignment of `ptr`, so that the choices depend only on the workspace size.
    pub(crate) fn set_workspace(&mut self, ptr: u64, bytes: usize) {
        let aligned = ptr.next_multiple_of(WORKSPACE_ALIGN as u64);
        self.workspace = (aligned, bytes.saturating_sub(WORKSPACE_ALIGN));
        for plan in self.plans.values_mut() {
            plan.algos = [None, None, None];
        }
    }

    /// `y = conv(x, w)`; each view with its device address, `pw` the filter's.
    pub(crate) fn forward(&mut self, x: (View, u64), pw: u64, y: (View, u64), spec: ConvSpec) -> Result<()> {
        self.run(Dir::Forward, x, pw, y, spec, 0.0)
    }

    /// `gx = conv_transpose(gy, w)`.
    pub(crate) fn backward_data(&mut self, gx: (View, u64), pw: u64, gy: (View, u64), spec: ConvSpec) -> Result<()> {
        self.run(Dir::Data, gx, pw, gy, spec, 0.0)
    }

    /// `gw = dL/dw`, or `gw += dL/dw` when `accumulate`; `pw` is gw's address.
    pub(crate) fn backward_filter(
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
        let shape = ConvShape { spec, cin: x.c, cout: y.c, h: x.h, w: x.w, dtype: x.dtype };
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
                    algos::preference(ranked, dir, family, |a| workspace_size(handle, &plan.desc, dir, a).ok())
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
                log::warn!(
                    "cuDNN {dir} convolution {shape:?} at batch {} (image strides {}, {}) runs algorithm \
                     {first}, not its choice {}, which needs {} bytes of workspace ({ws_bytes} reserved)",
                    g.n,
                    g.x_stride,
                    g.y_stride,
                    pref[0].0,
                    pref[0].1
                );
            }
            plan.algos[dir as usize] = Some(Choice { usable, current: 0 });
        }
        let Plan { desc, algos, .. } = plan;
        let Some(choice) = &mut algos[dir as usize] else { bail!("no cuDNN algorithm chosen") };
        let mut first_error: Option<(u32, cr::CudnnError)> = None;
        for (i, &(algo, bytes)) in choice.usable.iter().enumerate().skip(choice.current) {
            let wsp = if bytes > 0 { ws as usize as *mut c_void } else { std::ptr::null_mut() };
            match execute(handle, desc, dir, algo, (px, pw, py), (wsp, bytes), beta) {
                Ok(()) => {
                    if let Some((refused, e)) = &first_error {
                        log::warn!(
                            "cuDNN refused {dir} algorithm {refused} for {shape:?} at batch {} ({:?}): \
                             algorithm {algo} runs instead from now on",
                            g.n,
                            e.0
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
        Ok(Plan { desc: Descriptors::new(g)?, preferred: [None, None, None], algos: [None, None, None] })
    }
}
