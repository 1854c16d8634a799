//! One launch description for both ways a kernel runs: the real GPU (cudarc) and the host
//! execution layer (`kernels/host/`), so the configuration the GPU gets is the one tested.

use crate::backend::{Collective, ConvShape, ConvSpec, DType, DeviceMemory, Library, Span, View};
use crate::comm::rendezvous::Links;
use crate::comm::Group;
use crate::{bail, Result};

/// A kernel argument, in the kernel's parameter order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// `Buf<T>`: the elements of a span of the arena (the host layer bounds-checks every
    /// access against it; the GPU gets the bare pointer).
    Buf(Span),
    /// `int`.
    I32(i32),
    /// `unsigned`.
    U32(u32),
    /// `float`.
    F32(f32),
    /// `u64` (`unsigned long long`).
    U64(u64),
}

/// A kernel's arguments, built in its parameter order (`Args::new().view(x).ints([n, c])`).
pub(super) struct Args(pub(super) Vec<Arg>);

impl Args {
    /// No arguments yet.
    pub(super) fn new() -> Args {
        Args(Vec::new())
    }

    /// Appends `a`.
    pub(super) fn arg(mut self, a: Arg) -> Args {
        self.0.push(a);
        self
    }

    /// `Buf<T> x, u64 x_stride`: the elements a view covers and its image stride.
    pub(super) fn view(self, v: View) -> Args {
        self.view_buf(v).u64(v.img_stride)
    }

    /// `Buf<T> x`: the elements a view covers.
    pub(super) fn view_buf(self, v: View) -> Args {
        let len = (v.end() - v.off) / v.dtype.size();
        self.arg(Arg::Buf(Span { off: v.off, len, dtype: v.dtype, tag: v.tag }))
    }

    /// `Buf<T>` of each span.
    pub(super) fn spans<const N: usize>(mut self, spans: [Span; N]) -> Args {
        self.0.extend(spans.map(Arg::Buf));
        self
    }

    /// `Buf<unsigned>` of `len` 4-byte words at byte `off` (staged bytes, crop windows, labels).
    pub(super) fn words(self, off: usize, len: usize) -> Args {
        self.arg(Arg::Buf(Span::f32(off, len)))
    }

    /// `int` of each size (which must fit).
    pub(super) fn ints<const N: usize>(mut self, sizes: [usize; N]) -> Args {
        self.0.extend(sizes.map(|v| Arg::I32(i32::try_from(v).expect("size fits the kernels' int"))));
        self
    }

    /// `u64` of a size or stride.
    pub(super) fn u64(self, v: usize) -> Args {
        self.arg(Arg::U64(v as u64))
    }

    /// `float`.
    pub(super) fn f32(self, v: f32) -> Args {
        self.arg(Arg::F32(v))
    }
}

/// A kernel launch: grid and block in threads as CUDA's `dim3`, dynamic shared bytes, and
/// the arguments.
#[derive(Clone, Copy, Debug)]
pub struct Launch<'a> {
    /// The `__global__` function's name in kernels/*.cu.
    pub kernel: &'static str,
    /// Blocks (x, y, z).
    pub grid: [u32; 3],
    /// Threads per block (x, y, z).
    pub block: [u32; 3],
    /// Dynamic shared memory per block (`DN_SHARED`), bytes.
    pub shared: u32,
    /// Arguments, in parameter order.
    pub args: &'a [Arg],
}

/// What executes the CUDA backend's work: a real GPU, or the host device (kernels on the host
/// execution layer, convolutions on the CPU backend). Offsets count bytes of one arena.
pub trait Exec {
    /// What runs the work, for messages.
    fn describe(&self) -> String;
    /// Whether the convolutions take tensors of `dtype` (the kernels take every storage type).
    fn stores(&self, dtype: DType) -> bool {
        dtype == DType::F32
    }
    /// The run-time libraries it loaded (none on the host device).
    fn libraries(&self) -> Vec<Library> {
        Vec::new()
    }
    /// The convolution algorithm rankings planned with, as a record a later process on the
    /// same GPU and libraries can reuse (`None`: this executor has no algorithms to choose).
    fn algorithm_record(&self) -> Option<String> {
        None
    }
    /// Takes a record of [`Exec::algorithm_record`] from an earlier process before planning;
    /// the rankings taken, or why the record was refused (foreign, stale or corrupt).
    fn reuse_algorithm_record(&mut self, _record: &str) -> Result<usize> {
        Ok(0)
    }
    /// How many algorithm searches (cudnnFind calls) planning made.
    fn algorithm_searches(&self) -> usize {
        0
    }
    /// Chooses a convolution algorithm for each shape at this batch and returns the workspace
    /// they need, in bytes (a multiple of 4).
    fn conv_workspace_len(&mut self, convs: &[ConvShape], batch: usize) -> Result<usize>;
    /// Allocates the zeroed arena of `len` bytes, the only allocation; `conv_ws` is the
    /// region reserved for the convolutions.
    fn allocate(&mut self, len: usize, conv_ws: Span) -> Result<()>;
    /// The arena's bytes, and the device memory in use beyond what it was once the context was
    /// created (see [`DeviceMemory::process`]).
    fn memory(&self) -> DeviceMemory;
    /// Copies host bytes into the arena at byte `off`.
    fn write(&mut self, off: usize, data: &[u8]) -> Result<()>;
    /// Copies the arena's bytes at `off` into `out`, after all queued work.
    fn read_into(&self, off: usize, out: &mut [u8]) -> Result<()>;
    /// Queues a kernel launch.
    fn launch(&mut self, launch: &Launch) -> Result<()>;
    /// `y = conv(x, w)`, no bias; `w` is [cout, cin, k, k].
    fn conv_forward(&mut self, x: View, w: Span, y: View, spec: ConvSpec) -> Result<()>;
    /// `gx = conv_transpose(gy, w)` (overwrites gx).
    fn conv_backward_data(&mut self, gy: View, w: Span, gx: View, spec: ConvSpec) -> Result<()>;
    /// `gw = dL/dw` summed over the batch, or `gw += ...` when `accumulate`.
    fn conv_backward_filter(&mut self, x: View, gy: View, gw: Span, spec: ConvSpec, accumulate: bool) -> Result<()>;
    /// Joins a data-parallel job through its rendezvous's connections; an error where this
    /// executor cannot.
    fn join(&mut self, _links: Links) -> Result<()> {
        bail!("the {} cannot train as one rank of several", self.describe())
    }
    /// The job joined, if any.
    fn group(&self) -> Option<Group> {
        None
    }
    /// Queues a collective of the job joined.
    fn collective(&mut self, _op: Collective) -> Result<()> {
        bail!("a collective on the {}, which has joined no job", self.describe())
    }
    /// Starts recording the work queued from now on as a graph; the work still runs as it is
    /// queued (that run is the warm-up of what the graph will replay).
    fn capture_begin(&mut self) -> Result<()>;
    /// Ends the recording and stores it as graph `key` (a CUDA graph on the GPU); runs nothing.
    /// `Some(reason)` when the step could not become a graph and is stored as its ops instead
    /// (replayed op by op).
    fn capture_end(&mut self, key: u64) -> Result<Option<String>>;
    /// Runs recorded graph `key`; `false` when there is none (nothing ran).
    fn replay(&mut self, key: u64) -> Result<bool>;
}
