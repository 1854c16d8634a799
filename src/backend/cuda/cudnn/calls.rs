//! The cuDNN calls on one geometry's [`Descriptors`]: cudnnFind, the workspace an algorithm
//! needs, and the convolution itself, in each direction (algorithms as `algos` numbers them).

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
    let requested = if counted.is_ok() { max } else { 0 }.max(MIN_FIND_RESULTS_PER_ALGO * dir.algo_count() as c_int);
    let mut perf = vec![Perf::default(); requested as usize];
    let mut count: c_int = 0;
    // SAFETY: descriptors are live; `perf` has room for `requested` entries of the layout cuDNN
    // writes (see `Perf`); cuDNN allocates and frees its own buffers.
    unsafe {
        match dir {
            Dir::Forward => cs::cudnnFindConvolutionForwardAlgorithm(
                handle,
                d.x.raw(),
                d.w.raw(),
                d.conv.raw(),
                d.y.raw(),
                requested,
                &mut count,
                perf.as_mut_ptr().cast(),
            ),
            Dir::Data => cs::cudnnFindConvolutionBackwardDataAlgorithm(
                handle,
                d.w.raw(),
                d.y.raw(),
                d.conv.raw(),
                d.x.raw(),
                requested,
                &mut count,
                perf.as_mut_ptr().cast(),
            ),
            Dir::Filter => cs::cudnnFindConvolutionBackwardFilterAlgorithm(
                handle,
                d.x.raw(),
                d.y.raw(),
                d.conv.raw(),
                d.w.raw(),
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

/// Workspace bytes algorithm `algo` needs for the descriptors (an error when it does not
/// support them).
pub(super) fn workspace_size(
    handle: cs::cudnnHandle_t,
    d: &Descriptors,
    dir: Dir,
    algo: u32,
) -> std::result::Result<usize, cr::CudnnError> {
    let bad = cr::CudnnError(cs::cudnnStatus_t::CUDNN_STATUS_BAD_PARAM);
    // SAFETY: descriptors are live; the algorithm values come from the enums' ranges.
    unsafe {
        match dir {
            Dir::Forward => cr::get_convolution_forward_workspace_size(
                handle,
                d.x.raw(),
                d.w.raw(),
                d.conv.raw(),
                d.y.raw(),
                fwd_algo(algo).ok_or(bad)?,
            ),
            Dir::Data => cr::get_convolution_backward_data_workspace_size(
                handle,
                d.w.raw(),
                d.y.raw(),
                d.conv.raw(),
                d.x.raw(),
                data_algo(algo).ok_or(bad)?,
            ),
            Dir::Filter => cr::get_convolution_backward_filter_workspace_size(
                handle,
                d.x.raw(),
                d.y.raw(),
                d.conv.raw(),
                d.w.raw(),
                filter_algo(algo).ok_or(bad)?,
            ),
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
    let bad = cr::CudnnError(cs::cudnnStatus_t::CUDNN_STATUS_BAD_PARAM);
    // SAFETY: descriptors are live and describe the views at these arena addresses (checked by
    // the caller); the workspace holds `ws_bytes`; alpha/beta outlive the (host-side) call.
    unsafe {
        match dir {
            Dir::Forward => cr::convolution_forward(
                handle,
                a,
                d.x.raw(),
                px,
                d.w.raw(),
                pw,
                d.conv.raw(),
                fwd_algo(algo).ok_or(bad)?,
                ws,
                ws_bytes,
                b,
                d.y.raw(),
                py,
            ),
            Dir::Data => cr::convolution_backward_data(
                handle,
                a,
                d.w.raw(),
                pw,
                d.y.raw(),
                py,
                d.conv.raw(),
                data_algo(algo).ok_or(bad)?,
                ws,
                ws_bytes,
                b,
                d.x.raw(),
                px,
            ),
            Dir::Filter => cr::convolution_backward_filter(
                handle,
                a,
                d.x.raw(),
                px,
                d.y.raw(),
                py,
                d.conv.raw(),
                filter_algo(algo).ok_or(bad)?,
                ws,
                ws_bytes,
                b,
                d.w.raw(),
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
