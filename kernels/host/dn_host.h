// Host execution layer: the CUDA C++ vocabulary of kernels/dn.cuh for the host compiler, so
// kernels/*.cu run on the CPU in tests (see docs/host-layer.md). dn.cuh includes this header
// when DN_HOST is defined; the runtime (fibers, scheduler, pool) is in dn_host.cpp.
//
// Every GPU thread runs as a fiber; __syncthreads is a real barrier, warp collectives are
// warp-synchronous. Global buffers are bounds-checked spans; dynamic shared memory is tracked
// per 4-byte word (reads of unwritten words, and races between threads since the last barrier).
#pragma once

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "dn_rt.h"

typedef unsigned long long u64;

// ---- qualifiers ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ _Pragma("GCC error \"static __shared__ arrays are not supported: use DN_SHARED\"")

// ---- built-in variables ----
typedef ::dn::Idx3 uint3;
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(const ::dn::Idx3& v) : x(v.x), y(v.y), z(v.z) {}
};
#define threadIdx (static_cast<const ::dn::Idx3&>(::dn::tls_thread->tid))
#define blockIdx (static_cast<const ::dn::Idx3&>(::dn::tls_block->idx))
#define blockDim (static_cast<const ::dn::Idx3&>(::dn::tls_block->dim))
#define gridDim (static_cast<const ::dn::Idx3&>(::dn::tls_block->grid))
constexpr int warpSize = 32;

// ---- global memory: Buf<T> ----
// A span of the arena: every subscript is bounds-checked (and is where a launch that was
// aborted, by another thread's error or the time limit, stops this thread).
template <class T>
struct Buf {
  static_assert(sizeof(T) == 4 || sizeof(T) == 2,
                "Buf<T>: arena elements are 4 bytes (float, int, unsigned) or 2 (dn_bf16, dn_f16)");
  T* ptr;
  size_t len;
  size_t off;  // offset of this view in the launch argument (after `buf + n`)
  int arg;     // the argument's index

  Buf(T* p, size_t n, size_t o, int a) : ptr(p), len(n), off(o), arg(a) {}
  template <class U, class = std::enable_if_t<std::is_same<const U, T>::value && !std::is_same<U, T>::value>>
  Buf(const Buf<U>& b) : ptr(b.ptr), len(b.len), off(b.off), arg(b.arg) {}

  __attribute__((always_inline)) T& operator[](long long i) const {
    if (__builtin_expect((unsigned long long)i >= len, 0) ||
        __builtin_expect(::dn::tls_abort->load(std::memory_order_relaxed), 0))
      ::dn::buf_fail(arg, off, i, len);
    return ptr[i];
  }
  T& operator*() const { return (*this)[0]; }
  // `buf + n`: the view from element n on (n <= len).
  Buf operator+(long long n) const {
    if (n < 0 || (unsigned long long)n > len) ::dn::buf_fail(arg, off, n, len);
    return Buf(ptr + n, len - n, off + n, arg);
  }
};

// ---- dynamic shared memory ----
namespace dn {

template <class T>
struct Ident {
  typedef T type;
};

// The bits of `v` as a `To` of the same size (std::bit_cast, which C++17 lacks).
template <class To, class From>
inline To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From) && std::is_trivially_copyable<From>::value, "bit_cast: same-size values");
  To r;
  memcpy(&r, &v, sizeof r);
  return r;
}

__attribute__((always_inline)) inline bool synced(const Block* b, unsigned me, unsigned other, uint32_t gen) {
  // Same warp, and a warp collective (e.g. __syncwarp) completed since the access.
  return other < MAX_THREADS && (other >> 5) == (me >> 5) && b->wgen[(me >> 5) & 31] != gen;
}

// The warp's count of completed collectives, as thread `me` sees it.
__attribute__((always_inline)) inline uint32_t warp_gen(const Block* b, unsigned me) { return b->wgen[(me >> 5) & 31]; }

// Whether another thread, not synchronized with `me`, wrote shadowed word `s` in epoch e.
__attribute__((always_inline)) inline bool racing_write(const Block* b, const Shadow& s, unsigned me, uint32_t e) {
  return __builtin_expect(s.w_epoch == e && s.w_thr != me, 0) && !synced(b, me, s.w_thr, s.w_gen);
}

// Whether other threads, or one not synchronized with `me`, read shadowed word `s` in epoch e.
__attribute__((always_inline)) inline bool racing_read(const Block* b, const Shadow& s, unsigned me, uint32_t e) {
  return __builtin_expect(s.r_epoch == e && (s.r_thr != me || s.r_multi), 0) &&
         (s.r_multi || !synced(b, me, s.r_thr, s.r_gen));
}

// Who accesses shared memory: the block, the thread and the epoch.
struct Access {
  Block* b;
  unsigned me;
  uint32_t e;
};

// The access of shared `name`[i] through a reference made in epoch `made`, which must be the
// current one (a reference kept across __syncthreads is reported).
__attribute__((always_inline)) inline Access access(const char* name, long long i, uint32_t made) {
  Access a{tls_block, tls_thread->lin, tls_block->epoch};
  if (__builtin_expect(made != a.e, 0)) shared_race(4, name, i, a.me);
  return a;
}

__attribute__((always_inline)) inline void sh_read(unsigned word, unsigned nwords, const char* name, long long i,
                                                   uint32_t made) {
  const auto [b, me, e] = access(name, i, made);
  for (unsigned k = 0; k < nwords; k++) {
    Shadow& s = b->shadow[word + k];
    if (__builtin_expect(s.w_epoch < b->epoch_base, 0)) shared_uninit(name, i);
    if (racing_write(b, s, me, e)) shared_race(0, name, i, s.w_thr);
    if (s.r_epoch != e) {
      s.r_epoch = e;
      s.r_thr = (uint16_t)me;
      s.r_multi = 0;
      s.r_gen = warp_gen(b, me);
    } else if (s.r_thr != me) {
      s.r_multi = 1;
    } else {
      s.r_gen = warp_gen(b, me);
    }
  }
}

__attribute__((always_inline)) inline void sh_write(unsigned word, unsigned nwords, const char* name, long long i,
                                                    const void* v, uint32_t made) {
  const auto [b, me, e] = access(name, i, made);
  for (unsigned k = 0; k < nwords; k++) {
    Shadow& s = b->shadow[word + k];
    if (racing_read(b, s, me, e)) shared_race(1, name, i, s.r_thr != me ? s.r_thr : MULTI);
    if (racing_write(b, s, me, e) && memcmp(b->shared + 4 * (size_t)(word + k), (const char*)v + 4 * k, 4) != 0)
      shared_race(s.w_thr == ATOMIC ? 3 : 2, name, i, s.w_thr);
    s.w_epoch = e;
    s.w_thr = (uint16_t)me;
    s.w_gen = warp_gen(b, me);
  }
}

// An atomic read-modify-write of a shared word: atomics of different threads do not race with
// each other, but do with plain accesses of other threads in the same epoch.
inline void sh_atomic(unsigned word, const char* name, long long i) {
  Block* b = tls_block;
  unsigned me = tls_thread->lin;
  uint32_t e = b->epoch;
  Shadow& s = b->shadow[word];
  if (s.w_epoch < b->epoch_base) shared_uninit(name, i);
  if (s.w_thr != ATOMIC && racing_write(b, s, me, e)) shared_race(3, name, i, s.w_thr);
  if (racing_read(b, s, me, e)) shared_race(1, name, i, s.r_thr != me ? s.r_thr : MULTI);
  s.w_epoch = e;
  s.w_thr = ATOMIC;
}

template <class T>
struct SharedPtr {
  unsigned word;
  const char* name;
  long long idx;
  T* addr() const { return reinterpret_cast<T*>(tls_block->shared + 4 * (size_t)word); }
};

// `s[i]`: reading converts to T, assigning writes; both are checked. Hold values, not these:
// `float v = s[i];` (an `auto` reference kept across __syncthreads is reported).
template <class T>
struct SharedRef {
  unsigned word;
  const char* name;
  long long idx;
  uint32_t epoch;

  T* addr() const { return reinterpret_cast<T*>(tls_block->shared + 4 * (size_t)word); }
  operator T() const {
    sh_read(word, sizeof(T) / 4, name, idx, epoch);
    T v;
    memcpy(&v, addr(), sizeof(T));
    return v;
  }
  const SharedRef& operator=(T v) const {
    sh_write(word, sizeof(T) / 4, name, idx, &v, epoch);
    memcpy(addr(), &v, sizeof(T));
    return *this;
  }
  const SharedRef& operator=(const SharedRef& o) const { return *this = static_cast<T>(o); }
  template <class U>
  const SharedRef& operator+=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) + v); }
  template <class U>
  const SharedRef& operator-=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) - v); }
  template <class U>
  const SharedRef& operator*=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) * v); }
  template <class U>
  const SharedRef& operator/=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) / v); }
  template <class U>
  const SharedRef& operator|=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) | v); }
  template <class U>
  const SharedRef& operator&=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) & v); }
  template <class U>
  const SharedRef& operator^=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) ^ v); }
  const SharedRef& operator++() const { return *this += 1; }
  const SharedRef& operator--() const { return *this -= 1; }
  T operator++(int) const {
    T v = *this;
    *this = static_cast<T>(v + 1);
    return v;
  }
  T operator--(int) const {
    T v = *this;
    *this = static_cast<T>(v - 1);
    return v;
  }
  // `&s[i]` is only for the shared-memory atomics.
  SharedPtr<T> operator&() const { return SharedPtr<T>{word, name, idx}; }
};

// DN_SHARED(T, name): the launch's dynamic shared memory as T[shared / sizeof(T)] (all
// DN_SHARED declarations alias it, as `extern __shared__` arrays do).
template <class T>
struct Shared {
  static_assert(sizeof(T) % 4 == 0 && std::is_trivially_copyable<T>::value,
                "DN_SHARED(T, ...): T must be 4 or 8 bytes (shared memory is tracked per 4-byte word)");
  const char* name;
  unsigned first;  // first word
  unsigned long long count;
  long long base;  // element offset of this view (after `s + n`), for messages

  explicit Shared(const char* n)
      : name(n), first(0), count(tls_block->shared_bytes / sizeof(T)), base(0) {}
  Shared(const char* n, unsigned f, unsigned long long c, long long b) : name(n), first(f), count(c), base(b) {}

  __attribute__((always_inline)) SharedRef<T> operator[](long long i) const {
    if (__builtin_expect((unsigned long long)i >= count, 0)) shared_oob(name, base + i, base + count, sizeof(T));
    return SharedRef<T>{first + (unsigned)(i * (long long)(sizeof(T) / 4)), name, base + i, tls_block->epoch};
  }
  Shared operator+(long long n) const {
    if (n < 0 || (unsigned long long)n > count) shared_oob(name, base + n, base + count, sizeof(T));
    return Shared(name, first + (unsigned)(n * (long long)(sizeof(T) / 4)), count - n, base + n);
  }
};

}  // namespace dn

#define DN_SHARED(T, name) ::dn::Shared<T> name(#name)

// ---- barriers and fences ----
inline void __syncthreads(const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  ::dn::barrier(::dn::Op::Sync, 0, f, l);
}
inline int __syncthreads_count(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return ::dn::barrier(::dn::Op::SyncCount, p, f, l);
}
inline int __syncthreads_and(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return ::dn::barrier(::dn::Op::SyncAnd, p, f, l);
}
inline int __syncthreads_or(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return ::dn::barrier(::dn::Op::SyncOr, p, f, l);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- warp collectives ----
namespace dn {
template <class T>
inline T shfl(Op op, unsigned mask, T v, int param, int width, const char* f, int l) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled values are at most 8 bytes");
  unsigned long long bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = warp(op, mask, bits, param, width, f, l);
  T r;
  memcpy(&r, &bits, sizeof(T));
  return r;
}
}  // namespace dn

#define DN_HOST_SHFL(T)                                                                                     \
  inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize, const char* f = __builtin_FILE(), \
                       int l = __builtin_LINE()) {                                                          \
    return ::dn::shfl(::dn::Op::ShflIdx, mask, v, src, width, f, l);                                        \
  }                                                                                                         \
  inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = warpSize,                             \
                          const char* f = __builtin_FILE(), int l = __builtin_LINE()) {                     \
    return ::dn::shfl(::dn::Op::ShflUp, mask, v, (int)d, width, f, l);                                      \
  }                                                                                                         \
  inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = warpSize,                           \
                            const char* f = __builtin_FILE(), int l = __builtin_LINE()) {                   \
    return ::dn::shfl(::dn::Op::ShflDown, mask, v, (int)d, width, f, l);                                    \
  }                                                                                                         \
  inline T __shfl_xor_sync(unsigned mask, T v, int lm, int width = warpSize, const char* f = __builtin_FILE(), \
                           int l = __builtin_LINE()) {                                                      \
    return ::dn::shfl(::dn::Op::ShflXor, mask, v, lm, width, f, l);                                         \
  }
DN_HOST_SHFL(int)
DN_HOST_SHFL(unsigned)
DN_HOST_SHFL(long)
DN_HOST_SHFL(unsigned long)
DN_HOST_SHFL(long long)
DN_HOST_SHFL(unsigned long long)
DN_HOST_SHFL(float)
DN_HOST_SHFL(double)
#undef DN_HOST_SHFL

inline unsigned __ballot_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return (unsigned)::dn::warp(::dn::Op::Ballot, mask, p != 0, 0, 32, f, l);
}
inline int __any_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return (int)::dn::warp(::dn::Op::Any, mask, p != 0, 0, 32, f, l);
}
inline int __all_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return (int)::dn::warp(::dn::Op::All, mask, p != 0, 0, 32, f, l);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  ::dn::warp(::dn::Op::SyncWarp, mask, 0, 0, 32, f, l);
}
inline unsigned __activemask() { return ::dn::activemask(); }
#define DN_HOST_REDUCE(NAME, T, OP)                                                                          \
  inline T NAME(unsigned mask, T v, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {            \
    return (T)::dn::warp(::dn::Op::OP, mask, (unsigned long long)(unsigned)v, 0, 32, f, l);                  \
  }
DN_HOST_REDUCE(__reduce_add_sync, int, RedAddI)
DN_HOST_REDUCE(__reduce_add_sync, unsigned, RedAddU)
DN_HOST_REDUCE(__reduce_min_sync, int, RedMinI)
DN_HOST_REDUCE(__reduce_min_sync, unsigned, RedMinU)
DN_HOST_REDUCE(__reduce_max_sync, int, RedMaxI)
DN_HOST_REDUCE(__reduce_max_sync, unsigned, RedMaxU)
#undef DN_HOST_REDUCE

// ---- atomics ----
// Global memory (`&buf[i]`, bounds-checked by the subscript): real atomics, blocks run on
// several OS threads.
#define DN_HOST_ATOMIC_INT(T)                                                                                       \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                          \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }                          \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                          \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                            \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }                          \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }                        \
  inline T atomicCAS(T* p, T cmp, T v) {                                                                        \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);                         \
    return cmp;                                                                                                 \
  }                                                                                                             \
  inline T atomicMax(T* p, T v) {                                                                               \
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                               \
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {     \
    }                                                                                                           \
    return old;                                                                                                 \
  }                                                                                                             \
  inline T atomicMin(T* p, T v) {                                                                               \
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                               \
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {     \
    }                                                                                                           \
    return old;                                                                                                 \
  }
DN_HOST_ATOMIC_INT(int)
DN_HOST_ATOMIC_INT(unsigned)
DN_HOST_ATOMIC_INT(unsigned long long)
#undef DN_HOST_ATOMIC_INT

inline float atomicAdd(float* p, float v) {
  unsigned* w = reinterpret_cast<unsigned*>(p);
  unsigned old = __atomic_load_n(w, __ATOMIC_RELAXED), next;
  do {
    next = ::dn::bit_cast<unsigned>(::dn::bit_cast<float>(old) + v);
  } while (!__atomic_compare_exchange_n(w, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return ::dn::bit_cast<float>(old);
}
inline float atomicExch(float* p, float v) {
  unsigned old = __atomic_exchange_n(reinterpret_cast<unsigned*>(p), ::dn::bit_cast<unsigned>(v), __ATOMIC_RELAXED);
  return ::dn::bit_cast<float>(old);
}

// Shared memory (`&s[i]`): the block's threads share one OS thread, so these are plain
// read-modify-writes, tracked as atomics.
#define DN_HOST_SHARED_ATOMIC(NAME, EXPR)                                                          \
  template <class T>                                                                              \
  inline T NAME(::dn::SharedPtr<T> p, typename ::dn::Ident<T>::type v) {                          \
    static_assert(sizeof(T) == 4, "shared atomics are on 4-byte words");                          \
    ::dn::sh_atomic(p.word, p.name, p.idx);                                                       \
    T old = *p.addr();                                                                            \
    *p.addr() = (EXPR);                                                                           \
    return old;                                                                                   \
  }
DN_HOST_SHARED_ATOMIC(atomicAdd, old + v)
DN_HOST_SHARED_ATOMIC(atomicSub, old - v)
DN_HOST_SHARED_ATOMIC(atomicExch, v)
DN_HOST_SHARED_ATOMIC(atomicMax, old < v ? v : old)
DN_HOST_SHARED_ATOMIC(atomicMin, old > v ? v : old)
DN_HOST_SHARED_ATOMIC(atomicAnd, old & v)
DN_HOST_SHARED_ATOMIC(atomicOr, old | v)
#undef DN_HOST_SHARED_ATOMIC

// ---- math (the host libm's; __expf and friends are exact here, approximate on the GPU) ----
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
inline int __float2int_rn(float x) {
  if (x != x) return 0;
  float r = nearbyintf(x);
  return r >= 2147483648.0f ? INT_MAX : r < -2147483648.0f ? INT_MIN : (int)r;
}
inline int __float2int_rz(float x) {
  if (x != x) return 0;
  return x >= 2147483648.0f ? INT_MAX : x < -2147483648.0f ? INT_MIN : (int)x;
}
inline int __float2int_rd(float x) { return __float2int_rz(floorf(x)); }
inline int __float2int_ru(float x) { return __float2int_rz(ceilf(x)); }
inline unsigned __float2uint_rn(float x) {
  if (x != x || x <= 0.0f) return 0;
  float r = nearbyintf(x);
  return r >= 4294967296.0f ? UINT_MAX : (unsigned)r;
}
inline unsigned __float2uint_rz(float x) {
  if (x != x || x <= 0.0f) return 0;
  return x >= 4294967296.0f ? UINT_MAX : (unsigned)x;
}
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __int_as_float(int x) { return ::dn::bit_cast<float>(x); }
inline int __float_as_int(float x) { return ::dn::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return ::dn::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return ::dn::bit_cast<unsigned>(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

// min/max as CUDA overloads them (mixed signedness gives the unsigned type).
#define DN_HOST_MINMAX(A, B, R)                          \
  inline R min(A a, B b) { return (R)a < (R)b ? a : b; } \
  inline R max(A a, B b) { return (R)a > (R)b ? a : b; }
DN_HOST_MINMAX(int, int, int)
DN_HOST_MINMAX(unsigned, unsigned, unsigned)
DN_HOST_MINMAX(int, unsigned, unsigned)
DN_HOST_MINMAX(unsigned, int, unsigned)
DN_HOST_MINMAX(long, long, long)
DN_HOST_MINMAX(unsigned long, unsigned long, unsigned long)
DN_HOST_MINMAX(long long, long long, long long)
DN_HOST_MINMAX(unsigned long long, unsigned long long, unsigned long long)
DN_HOST_MINMAX(long long, unsigned long long, unsigned long long)
DN_HOST_MINMAX(unsigned long long, long long, unsigned long long)
#undef DN_HOST_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---- launching (used by the generated wrappers in $OUT_DIR/host_kernels.cpp) ----
namespace dn {

inline const char* kind_name(unsigned k) {
  switch (k) {
    case ARG_BUF: return "Buf";
    case ARG_I32: return "I32";
    case ARG_U32: return "U32";
    case ARG_F32: return "F32";
    case ARG_U64: return "U64";
    default: return "an unknown kind";
  }
}

template <class P>
struct ArgConv {
  static_assert(sizeof(P) == 0, "kernel parameters are Buf<T>, int, unsigned, float or u64");
};
template <class U>
struct ArgConv<Buf<U>> {
  static constexpr unsigned kind = ARG_BUF;
  static const char* name() { return "Buf<...>"; }
  static Buf<U> get(const DnArg& a, int i) { return Buf<U>(static_cast<U*>(a.ptr), a.len, 0, i); }
};
template <>
struct ArgConv<int> {
  static constexpr unsigned kind = ARG_I32;
  static const char* name() { return "int"; }
  static int get(const DnArg& a, int) { return (int)(unsigned)a.bits; }
};
template <>
struct ArgConv<unsigned> {
  static constexpr unsigned kind = ARG_U32;
  static const char* name() { return "unsigned"; }
  static unsigned get(const DnArg& a, int) { return (unsigned)a.bits; }
};
template <>
struct ArgConv<float> {
  static constexpr unsigned kind = ARG_F32;
  static const char* name() { return "float"; }
  static float get(const DnArg& a, int) { return __uint_as_float((unsigned)a.bits); }
};
template <>
struct ArgConv<unsigned long long> {
  static constexpr unsigned kind = ARG_U64;
  static const char* name() { return "u64"; }
  static unsigned long long get(const DnArg& a, int) { return a.bits; }
};

template <class... P>
inline int check_args(const char* kernel, const DnArg* a, char* err, size_t err_len) {
  const unsigned kinds[] = {ArgConv<P>::kind..., 0u};
  const char* names[] = {ArgConv<P>::name()..., nullptr};
  for (size_t i = 0; i < sizeof...(P); i++)
    if (a[i].kind != kinds[i])
      return config_error(kernel, err, err_len, "argument %zu: the kernel takes %s, the launch passes %s", i,
                          names[i], kind_name(a[i].kind));
  return 0;
}

template <class... P, size_t... I>
int launch_tuple(void (*k)(P...), const char* kernel, const DnDims* d, const DnArg* a, char* err, size_t err_len,
                 std::index_sequence<I...>) {
  std::tuple<P...> args(ArgConv<P>::get(a[I], (int)I)...);
  (void)a;
  return run(kernel, d, [k, args]() { std::apply(k, args); }, err, err_len);
}

// Runs kernel k (named `kernel`) with the launch's dims and arguments: 0, or 1 with a message.
template <class... P>
int launch(void (*k)(P...), const char* kernel, const DnDims* d, const DnArg* a, size_t nargs, char* err,
           size_t err_len) {
  if (nargs != sizeof...(P))
    return config_error(kernel, err, err_len, "the kernel takes %zu arguments, the launch passes %zu",
                        sizeof...(P), nargs);
  if (check_args<P...>(kernel, a, err, err_len)) return 1;
  return launch_tuple(k, kernel, d, a, err, err_len, std::index_sequence_for<P...>{});
}

}  // namespace dn
