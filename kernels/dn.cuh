// The vocabulary every kernel in kernels/*.cu is written in. build.rs concatenates this file
// and the kernels (sorted by name) into one translation unit, which is compiled three ways:
// nvcc to PTX, NVRTC at first use, and the host C++ compiler against kernels/host/ (the host
// execution layer that runs the kernels on the CPU in tests). So kernels are plain CUDA C++:
// no inline PTX, no standard headers, no static __shared__ arrays, no float atomics across
// blocks (results must be bitwise reproducible).
//
// - Global-memory operands are `Buf<T>` (a pointer on the GPU; a bounds-checked span on the
//   host), passed from Rust as `Arg::Buf`.
// - Shared memory is dynamic only: `DN_SHARED(T, name);` declares it, sized by the launch's
//   shared bytes (the host layer poisons it and reports reads of unwritten or racing cells).
// - Kernels are `extern "C" __global__ void name(...)` (looked up by name, unmangled).
// - Scalars are `int`, `unsigned`, `float` and `u64`, matching `Arg::I32`, `U32`, `F32`, `U64`.

#ifdef DN_HOST
#include "host/dn_host.h"
#else
typedef unsigned long long u64;
template <class T> using Buf = T*;
#define DN_SHARED(T, name) extern __shared__ T name[]
#ifndef INFINITY  // NVRTC has no math headers
#define INFINITY __int_as_float(0x7f800000)
#endif
#endif

// Threads per block of the 1-D elementwise kernels and of the block reductions.
#define DN_BLOCK 256

// ---- helpers shared by the kernels ----

// Element i of a 1-D launch.
__device__ __forceinline__ u64 dn_index() { return blockIdx.x * (u64)blockDim.x + threadIdx.x; }

// (image, channel plane, pixel) of this thread's element of a 1-D launch over n images of c
// planes of hw; false past the last element (the thread has nothing to do).
__device__ __forceinline__ bool dn_element(int n, int c, int hw, u64& img, u64& plane, int& p) {
    const u64 i = dn_index(), chw = (u64)c * hw;
    if (i >= (u64)n * chw) return false;
    img = i / chw;
    const u64 r = i - img * chw;
    plane = r / hw;
    p = (int)(r - plane * hw);
    return true;
}

#define DN_BN_EPS 1e-5f

// gamma / sqrt(var + eps) and beta - mean * scale of channel c.
template <class P>
__device__ void bn_affine(P mean, P var, P gamma, P beta, int c, float& scale, float& shift, float& inv_std) {
    inv_std = 1.0f / sqrtf(var[c] + DN_BN_EPS);
    scale = gamma[c] * inv_std;
    shift = beta[c] - mean[c] * scale;
}

// relu(x * scale + shift) with bn_affine's constants: every kernel that applies a BN-ReLU
// computes it here, so the values are bitwise the bn_relu kernel's wherever they are computed.
__device__ __forceinline__ float dn_bn_relu(float x, float scale, float shift) { return fmaxf(x * scale + shift, 0.0f); }

// Sums `a` and `b` over the block (blockDim.x a power of two; `s` holds 2 * blockDim.x
// doubles); every thread gets the totals.
template <class S>
__device__ void block_sum2(S s, double& a, double& b) {
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = a;
    s[n + t] = b;
    __syncthreads();
    for (int h = n / 2; h > 0; h /= 2) {
        if (t < h) {
            const double u = s[t + h], v = s[n + t + h];
            s[t] = s[t] + u;
            s[n + t] = s[n + t] + v;
        }
        __syncthreads();
    }
    a = s[0];
    b = s[n];
    __syncthreads();
}

