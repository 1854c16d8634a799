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
// - Scalars are `int`, `unsigned`, `float` and `u64`, matching `Arg::I32`, `U32`, `F32`, `U64`.

#ifdef DN_HOST
#include "host/dn_host.h"
#else
typedef unsigned long long u64;
template <class T> using Buf = T*;
#define DN_SHARED(T, name) extern __shared__ T name[]
#endif

// Threads per block of the 1-D elementwise kernels and of the block reductions.
#define DN_BLOCK 256
