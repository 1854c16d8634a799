// Correct kernels for tests/host_layer.rs: results are checked against values computed in Rust.
#include "dn.cuh"

// out[b] = sum of x over block b's elements (i < n): a shared-memory tree, then a warp-shuffle
// tail. blockDim.x is a power of two >= 64.
__global__ void hosttest_block_sum(Buf<const float> x, Buf<float> out, int n) {
  DN_SHARED(float, s);
  unsigned t = threadIdx.x;
  unsigned i = blockIdx.x * blockDim.x + t;
  s[t] = i < (unsigned)n ? x[i] : 0.0f;
  __syncthreads();
  for (unsigned h = blockDim.x / 2; h >= 32; h >>= 1) {
    if (t < h) s[t] += s[t + h];
    __syncthreads();
  }
  if (t < 32) {
    float v = s[t];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (t == 0) out[blockIdx.x] = v;
  }
}

// 2 * rounds + 1 barriers: each round every thread reads its right neighbour's cell, then
// (after a barrier) overwrites its own with that value + 1. y[global thread] = sum of reads.
__global__ void hosttest_barriers(Buf<float> y, int rounds) {
  DN_SHARED(float, s);
  unsigned t = threadIdx.x, n = blockDim.x;
  s[t] = (float)t;
  __syncthreads();
  float acc = 0.0f;
  for (int r = 0; r < rounds; r++) {
    float v = s[(t + 1) % n];
    __syncthreads();
    s[t] = v + 1.0f;
    __syncthreads();
    acc += v;
  }
  y[blockIdx.x * n + t] = acc;
}

// Warp collectives; 16 results per thread.
__global__ void hosttest_warp(Buf<const int> x, Buf<int> out) {
  const unsigned full = 0xffffffffu;
  unsigned t = threadIdx.x;
  int v = x[blockIdx.x * blockDim.x + t];
  Buf<int> o = out + (blockIdx.x * blockDim.x + t) * 16;
  o[0] = __shfl_down_sync(full, v, 3);
  o[1] = __shfl_up_sync(full, v, 5);
  o[2] = __shfl_xor_sync(full, v, 6);
  o[3] = __shfl_sync(full, v, 7, 16);
  o[4] = __shfl_down_sync(full, v, 2, 8);
  o[5] = (int)__ballot_sync(full, v % 3 == 0);
  o[6] = __any_sync(full, v > 1000);
  o[7] = __all_sync(full, v >= 0);
  o[8] = __all_sync(full, v < 1000);
  o[9] = __reduce_add_sync(full, v);
  o[10] = __reduce_max_sync(full, (unsigned)v);
  o[11] = (int)__shfl_xor_sync(full, (float)v * 0.5f, 1) * 2;
  o[12] = __syncthreads_count(v % 2 == 0);
  o[13] = __syncthreads_or(v > 1000);
  o[14] = __syncthreads_and(v > 1000);
  // Lanes 0-15 and 16-31 as two groups of their own.
  unsigned half = (t & 16) ? 0xffff0000u : 0x0000ffffu;
  o[15] = __shfl_sync(half, v, (int)(t & 16) + 15);
}

// Global and shared atomics from every thread of every block.
__global__ void hosttest_atomics(Buf<int> counts, Buf<int> maxi, Buf<float> fsum, Buf<unsigned> ucount) {
  int g = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&counts[0], 1);
  atomicMax(&maxi[0], g);
  atomicAdd(&fsum[0], 1.0f);
  atomicAdd(&ucount[0], 2u);
  DN_SHARED(int, s);
  if (threadIdx.x == 0) s[0] = 0;
  __syncthreads();
  atomicAdd(&s[0], 1);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(&counts[1], (int)s[0]);
}

// A 2-D grid of 2-D blocks: y[row * width + col] = row * 1000 + col, one per thread.
__global__ void hosttest_grid2d(Buf<float> y, int width, int height) {
  int col = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  int row = (int)(blockIdx.y * blockDim.y + threadIdx.y);
  if (col < width && row < height) y[row * width + col] = (float)(row * 1000 + col);
}

// The storage types (kernels/dn.cuh): widened[i] = dn_get(bits[i]) for i < n_bits, and for
// i < n_values narrowed[i] = dn_put<T>(values[i]), rounded[i] = dn_round<T>(values[i]).
template <class T>
__device__ void hosttest_storage(Buf<const T> bits, Buf<float> widened, int n_bits, Buf<const float> values,
                                 Buf<T> narrowed, Buf<float> rounded, int n_values) {
  int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n_bits) widened[i] = dn_get(bits[i]);
  if (i < n_values) {
    narrowed[i] = dn_put<T>(values[i]);
    rounded[i] = dn_round<T>(values[i]);
  }
}
DN_STORAGE_KERNELS(hosttest_storage,
                   (Buf<const T> bits, Buf<float> widened, int n_bits, Buf<const float> values, Buf<T> narrowed,
                    Buf<float> rounded, int n_values),
                   (bits, widened, n_bits, values, narrowed, rounded, n_values))
