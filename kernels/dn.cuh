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


// ---- storage types (docs/precision.md) ----
// A tensor ([`View`]) holds f32, bf16 or IEEE half; spans are f32. The 16-bit types are their
// bits, widened exactly on load (dn_get) and rounded to nearest, ties to even, on store
// (dn_put: a NaN stays a quiet NaN with its sign and top payload bits), by integer arithmetic
// that is the same code on the GPU and on the host layer, and bit for bit the CPU backend's
// (crate::elem). CUDA's __nv_bfloat16 and __half are not used: NVRTC has no cuda_bf16.h or
// cuda_fp16.h unless a CUDA toolkit's include directory is found.
struct dn_bf16 {
    unsigned short bits;
};
struct dn_f16 {
    unsigned short bits;
};

__device__ __forceinline__ float dn_get(float v) { return v; }
__device__ __forceinline__ float dn_get(dn_bf16 v) { return __uint_as_float((unsigned)v.bits << 16); }
__device__ __forceinline__ float dn_get(dn_f16 v) {
    const unsigned sign = (unsigned)(v.bits & 0x8000u) << 16, e = (v.bits >> 10) & 0x1fu, m = v.bits & 0x3ffu;
    if (e == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    if (e != 0) return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
    // Zero or subnormal: m 2^-24, exact.
    const float s = (float)m * 5.9604644775390625e-8f;
    return sign ? -s : s;
}

// `v` rounded to T.
template <class T>
__device__ T dn_put(float v);
template <>
__device__ __forceinline__ float dn_put<float>(float v) { return v; }
template <>
__device__ __forceinline__ dn_bf16 dn_put<dn_bf16>(float v) {
    const unsigned x = __float_as_uint(v);
    if (v != v) return dn_bf16{(unsigned short)((x >> 16) | 0x40u)};
    return dn_bf16{(unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}
template <>
__device__ __forceinline__ dn_f16 dn_put<dn_f16>(float v) {
    const unsigned x = __float_as_uint(v), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return dn_f16{(unsigned short)(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};
    if (a >= 0x477ff000u) return dn_f16{(unsigned short)(sign | 0x7c00u)};  // 65520 and up: infinity
    if (a >= 0x38800000u) {  // a normal half: rebias the exponent, round 13 bits off
        const unsigned r = a - 0x38000000u;
        return dn_f16{(unsigned short)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13))};
    }
    if (a <= 0x33000000u) return dn_f16{(unsigned short)sign};  // 2^-25 and below: zero
    // A subnormal half m 2^-24: the significand shifted right by 126 - e (14 to 24) and rounded.
    const unsigned shift = 126u - (a >> 23), m = (a & 0x7fffffu) | 0x800000u;
    const unsigned q = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    return dn_f16{(unsigned short)(sign | (q + (rest > half || (rest == half && (q & 1u)))))};
}

// `v` as a T holds it: rounded and widened again.
template <class T>
__device__ __forceinline__ float dn_round(float v) {
    return dn_get(dn_put<T>(v));
}

// DN_STORAGE_KERNELS(name, (params), (args)): the kernels name_f32, name_bf16 and name_f16,
// each calling the template `name<T>(args)` with its storage type T, which `params` may name
// (each is declared in a namespace of its own that defines T; build.rs lists them).
#define DN_KERNEL_AS(name, suffix, Elem, params, args)                    \
    namespace dn_##name##_##suffix {                                      \
    typedef Elem T;                                                       \
    extern "C" __global__ void name##_##suffix params { ::name<T> args; } \
    }                                                                     \
    using dn_##name##_##suffix::name##_##suffix;
#define DN_STORAGE_KERNELS(name, params, args)             \
    DN_KERNEL_AS(name, f32, float, params, args)           \
    DN_KERNEL_AS(name, bf16, dn_bf16, params, args)        \
    DN_KERNEL_AS(name, f16, dn_f16, params, args)
