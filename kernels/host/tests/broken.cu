// Deliberately broken kernels for tests/host_layer.rs: each must fail its launch with a message.
#include "dn.cuh"

// Doubles its cell, then reads the right neighbour's without a barrier in between. Only block
// `only` works: block 0 runs its threads in ascending order, block 1 descending.
__global__ void hosttest_missing_barrier(Buf<const float> x, Buf<float> y, unsigned only) {
  if (blockIdx.x != only) return;
  DN_SHARED(float, s);
  unsigned t = threadIdx.x, n = blockDim.x;
  s[t] = x[t];
  __syncthreads();
  s[t] = s[t] * 2.0f;
  y[t] = s[(t + 1) % n];
}

// mode 0: half the block waits at a barrier the other half skips (and exits).
// mode 1: the halves wait at two different barriers.
// mode 2: lanes 0-15 of each warp wait at a shuffle, lanes 16-31 at a barrier.
__global__ void hosttest_divergent_barrier(Buf<float> y, int mode) {
  unsigned t = threadIdx.x;
  if (mode == 0) {
    if (t < 128) __syncthreads();
  } else if (mode == 1) {
    if (t < 128) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else {
    if ((t & 31) < 16) {
      y[t] = __shfl_xor_sync(0xffffffffu, 1.0f, 16);
    } else {
      __syncthreads();
    }
  }
  y[t] = 1.0f;
}

// One thread per element, with more threads than y has elements.
__global__ void hosttest_global_oob(Buf<float> y, int view) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (view) {
    Buf<float> tail = y + view;
    tail[i] = 1.0f;
  } else {
    y[i] = 1.0f;
  }
}

// Thread t writes s[t + 1]: the last thread is past the launch's shared memory.
__global__ void hosttest_shared_oob(Buf<float> y) {
  DN_SHARED(float, s);
  unsigned t = threadIdx.x;
  s[t + 1] = 1.0f;
  __syncthreads();
  y[t] = 1.0f;
}

// Only even threads write; every thread reads its odd/even partner's cell.
__global__ void hosttest_shared_uninit(Buf<float> y) {
  DN_SHARED(float, s);
  unsigned t = threadIdx.x;
  if (t % 2 == 0) s[t] = 1.0f;
  __syncthreads();
  y[t] = s[t ^ 1];
}

// mode 0: every thread writes its own id to s[0] (conflicting writes, no barrier).
// mode 1: every thread writes 1 to s[0] (same value: allowed).
// mode 2: an `auto` reference to shared memory kept across a barrier.
// mode 3: atomics on s[0] and a plain read of it before the barrier.
__global__ void hosttest_shared_misc(Buf<float> y, int mode) {
  DN_SHARED(float, s);
  unsigned t = threadIdx.x;
  if (mode == 0) {
    s[0] = (float)t;
  } else if (mode == 1) {
    s[0] = 1.0f;
  } else if (mode == 2) {
    s[t] = (float)t;
    auto r = s[t];
    __syncthreads();
    y[t] = r;
    return;
  } else {
    if (t == 0) s[0] = 0.0f;
    __syncthreads();
    atomicAdd(&s[0], 1.0f);
    y[t] = s[0];
  }
  __syncthreads();
  y[t] = s[0];
}

// Spins until y[0] < 0, which never happens.
__global__ void hosttest_spin(Buf<float> y) {
  while (y[0] >= 0.0f) y[1] = y[1] + 1.0f;
}

// mode 0: a full-mask shuffle in a block of 48 threads (warp 1 has 16 lanes).
// mode 1: a ballot whose mask leaves out the calling lane.
// mode 2: even lanes shuffle among themselves (mask 0x55555555), odd lanes with the full mask.
__global__ void hosttest_warp_misuse(Buf<float> y, int mode) {
  unsigned t = threadIdx.x;
  float v = 1.0f;
  if (mode == 0)
    v = __shfl_down_sync(0xffffffffu, v, 16);
  else if (mode == 1)
    v = (float)__ballot_sync(0x1u, 1);
  else
    v = __shfl_xor_sync(t % 2 == 0 ? 0x55555555u : 0xffffffffu, v, 2);
  y[t] = v;
}
