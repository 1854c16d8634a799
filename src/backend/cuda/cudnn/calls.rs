//! The cuDNN calls on one geometry's [`Descriptors`]: cudnnFind, the workspace an algorithm
//! needs, and the convolution itself, in each direction (algorithms as `algos` numbers them).
//! Every direction's calls take the operands in one order: the two inputs, the convolution,
//! the output (forward: x, w -> y; backward data: w, dy -> dx; backward filter: x, dy -> dw).

use std::ffi::{c_int, c_void};

use cudarc::cudnn::{result as cr, sys as cs};

use super::descriptor::Descriptors;
use crate::backend::cuda::algos::{Dir, Perf};

/// cudnnFind is asked for at least this many results per algorithm (one per math type it
/// may try), when cuDNN cannot say how many it returns at most.
const MIN_FIND_RESULTS_PER_ALGO: c_int = 4;

/// cudnnFind for one direction, every result cuDNN reports (as many as it can return, so that
/// an FMA entry is never pushed out by the other math types' entries).
pub(super) fn find(
    handle: cs::cudnnHandle_t,
    d: &Descriptors,
    dir: Dir,
) -> std::result::Result<Vec<Perf>, cr::CudnnError> {
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
    let n = if counted.is_ok() { max } else { 0 }.max(MIN_FIND_RESULTS_PER_ALGO * dir.algo_count() as c_int);
    let mut perf = vec![Perf::default(); n as usize];
    let (x, w, y, conv) = d.raw();
    let mut count: c_int = 0;
    let (found, out): (*mut c_int, *mut Perf) = (&mut count, perf.as_mut_ptr());
    // SAFETY: descriptors are live; `out` has room for `n` entries of the layout cuDNN writes
    // (see `Perf`) and `found` for one int; cuDNN allocates and frees its own buffers.
    unsafe {
        match dir {
            Dir::Forward => cs::cudnnFindConvolutionForwardAlgorithm(handle, x, w, conv, y, n, found, out.cast()),
            Dir::Data => cs::cudnnFindConvolutionBackwardDataAlgorithm(handle, w, y, conv, x, n, found, out.cast()),
            Dir::Filter => cs::cudnnFindConvolutionBackwardFilterAlgorithm(handle, x, y, conv, w, n, found, out.cast()),
        }
        .result()?;
    }
    perf.truncate(count.clamp(0, n) as usize);
    Ok(perf)
}

/// Workspace bytes algorithm `algo` needs for the descriptors (an error when it does not
/// support them).
pub(super) fn workspace_size(
    handle: cs::cudnnHandle_t,
    d: &Descriptors,
    dir: Dir,
    algo: u32,
) -> std::result::Result<usize, cr::CudnnError> {
    let (x, w, y, conv) = d.raw();
    // SAFETY: descriptors are live; the algorithm values are variants of their enums (`to_enum`).
    unsafe {
        match dir {
            Dir::Forward => cr::get_convolution_forward_workspace_size(handle, x, w, conv, y, to_enum(algo)?),
            Dir::Data => cr::get_convolution_backward_data_workspace_size(handle, w, y, conv, x, to_enum(algo)?),
            Dir::Filter => cr::get_convolution_backward_filter_workspace_size(handle, x, y, conv, w, to_enum(algo)?),
        }
    }
}

/// Runs one convolution on the descriptors `d`: `(px, pw, py)` are the input-side, filter and
/// output-side addresses.
pub(super) fn execute(
    handle: cs::cudnnHandle_t,
    d: &Descriptors,
    dir: Dir,
    algo: u32,
    (px, pw, py): (u64, u64, u64),
    (ws, ws_bytes): (*mut c_void, usize),
    beta: f32,
) -> std::result::Result<(), cr::CudnnError> {
    let alpha = 1.0f32;
    let (a, b) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
    let (px, pw, py) = (px as usize as *mut c_void, pw as usize as *mut c_void, py as usize as *mut c_void);
    let (x, w, y, conv) = d.raw();
    // SAFETY: descriptors are live and describe the views at these arena addresses (checked by
    // the caller); the workspace holds `ws_bytes`; alpha/beta outlive the (host-side) call; the
    // algorithm values are variants of their enums (`to_enum`).
    unsafe {
        match dir {
            Dir::Forward => {
                cr::convolution_forward(handle, a, x, px, w, pw, conv, to_enum(algo)?, ws, ws_bytes, b, y, py)
            }
            Dir::Data => {
                cr::convolution_backward_data(handle, a, w, pw, y, py, conv, to_enum(algo)?, ws, ws_bytes, b, x, px)
            }
            Dir::Filter => {
                cr::convolution_backward_filter(handle, a, x, px, y, py, conv, to_enum(algo)?, ws, ws_bytes, b, w, pw)
            }
        }
    }
}

/// One of cuDNN's algorithm enums: its algorithms in the order of their values, which are
/// `algos`' numbers.
trait AlgoEnum: Copy + 'static {
    /// Algorithm `i` is `ALL[i]`.
    const ALL: &'static [Self];
}

impl AlgoEnum for cs::cudnnConvolutionFwdAlgo_t {
    const ALL: &'static [Self] = {
        use cs::cudnnConvolutionFwdAlgo_t::*;
        &[
            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
            CUDNN_CONVOLUTION_FWD_ALGO_FFT,
            CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
            CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
            CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        ]
    };
}

impl AlgoEnum for cs::cudnnConvolutionBwdDataAlgo_t {
    const ALL: &'static [Self] = {
        use cs::cudnnConvolutionBwdDataAlgo_t::*;
        &[
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
        ]
    };
}

impl AlgoEnum for cs::cudnnConvolutionBwdFilterAlgo_t {
    const ALL: &'static [Self] = {
        use cs::cudnnConvolutionBwdFilterAlgo_t::*;
        &[
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
        ]
    };
}

/// Algorithm `algo` as enum `A`, or `CUDNN_STATUS_BAD_PARAM` when `A` has no such algorithm.
fn to_enum<A: AlgoEnum>(algo: u32) -> std::result::Result<A, cr::CudnnError> {
    A::ALL.get(algo as usize).copied().ok_or(cr::CudnnError(cs::cudnnStatus_t::CUDNN_STATUS_BAD_PARAM))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_number_is_its_enum_value() {
        macro_rules! check {
            ($t:ty, $count:expr) => {
                assert_eq!(<$t>::ALL.len() as u32, $count as u32, stringify!($t));
                for (i, a) in <$t>::ALL.iter().enumerate() {
                    assert_eq!(*a as u32, i as u32, "{:?}", a);
                }
                assert!(to_enum::<$t>($count as u32).is_err());
            };
        }
        check!(cs::cudnnConvolutionFwdAlgo_t, cs::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT);
        check!(
            cs::cudnnConvolutionBwdDataAlgo_t,
            cs::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT
        );
        check!(
            cs::cudnnConvolutionBwdFilterAlgo_t,
            cs::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT
        );
    }
}
