// Host execution layer, runtime side: the state that the kernel vocabulary (dn_host.h) and the
// scheduler (dn_host.cpp) share. Kernels never use this directly.
//
// One launch is a Job. Pool workers (OS threads) claim its blocks one at a time; a block's
// threads are fibers on the worker's thread, run by the worker's scheduler (run_block) until
// each waits at a barrier or a warp collective, exits, or fails.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>

extern "C" {
// The launch configuration, as Rust's `Launch` (src/backend/cuda/host_layer.rs mirrors it).
struct DnDims {
  unsigned grid[3];
  unsigned block[3];
  unsigned shared;      // dynamic shared memory per block, bytes
  unsigned timeout_ms;  // 0: $DENSENET_HOST_TIMEOUT_S, else 20 s
};

// One kernel argument, as Rust's `Arg` (mirrored in host_layer.rs).
struct DnArg {
  unsigned kind;            // dn::ArgKind
  unsigned pad;
  unsigned long long bits;  // scalars: the bit pattern (32-bit kinds in the low half)
  void* ptr;                // Buf: the first element
  size_t len;               // Buf: elements
};
}

namespace dn {

enum ArgKind : unsigned { ARG_BUF = 0, ARG_I32 = 1, ARG_U32 = 2, ARG_F32 = 3, ARG_U64 = 4 };

struct Idx3 {
  unsigned x, y, z;
};

// Where a GPU thread (fiber) stands.
enum class St : uint8_t { Ready, Barrier, Warp, Exited };

// Block barriers and warp collectives.
enum class Op : uint8_t {
  Sync,
  SyncCount,
  SyncAnd,
  SyncOr,
  ShflIdx,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
  SyncWarp,
  RedAddI,
  RedAddU,
  RedMinI,
  RedMinU,
  RedMaxI,
  RedMaxU,
};

// One GPU thread of the running block.
struct Thread {
  void* sp;  // saved stack pointer while switched out
  Idx3 tid;
  unsigned lin;  // linear id in the block: x + y*dim.x + z*dim.x*dim.y; lane = lin % 32
  St st;
  Op op;        // the barrier or collective it waits at
  uint8_t width;
  unsigned mask;
  int param;
  unsigned long long val, res;
  const char* file;  // call site of the wait
  int line;
};

// Shadow state of one 4-byte word of shared memory. Epochs count block barriers (per worker,
// increasing across blocks, so a word written before this block's first epoch is unwritten).
struct Shadow {
  uint32_t w_epoch, r_epoch;  // epoch of the last write / of the reads
  uint16_t w_thr, r_thr;      // the last writer (a thread or ATOMIC) / the epoch's first reader
  uint32_t w_gen, r_gen;      // the warp's collective count at that access (__syncwarp order)
  uint8_t r_multi;            // another thread read in the epoch too
};
constexpr uint16_t MULTI = 0xffff, ATOMIC = 0xfffe;

// CUDA's most threads in a block, and so the most warps of 32.
constexpr unsigned MAX_THREADS = 1024, MAX_WARPS = MAX_THREADS / 32;

struct Job;

// The block a worker runs.
struct Block {
  Job* job;
  const char* kernel;
  Idx3 idx, dim, grid;
  unsigned long long lin;
  unsigned nthreads, exited, arrived;
  Thread* th;
  unsigned char* shared;
  unsigned shared_bytes;
  Shadow* shadow;
  uint32_t epoch, epoch_base;
  uint32_t wgen[MAX_WARPS];     // completed collectives per warp
  unsigned wwaiting[MAX_WARPS];  // lanes waiting at a collective, per warp
};

extern __thread Thread* tls_thread __attribute__((tls_model("initial-exec")));
extern __thread Block* tls_block __attribute__((tls_model("initial-exec")));
extern __thread const std::atomic<bool>* tls_abort __attribute__((tls_model("initial-exec")));

// Failures inside a kernel: record the first error of the launch, abort it, and leave the block
// (the fiber is never resumed). The message gets the kernel, block and thread prepended.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// The launch was aborted (another thread failed, or the time limit): leave the block quietly.
[[noreturn]] void abandon();
[[noreturn]] void buf_fail(int arg, size_t off, long long i, size_t len);
[[noreturn]] void shared_oob(const char* name, long long i, unsigned long long count, unsigned elem_bytes);
[[noreturn]] void shared_uninit(const char* name, long long i);
// kind: 0 read-after-write, 1 write-after-read, 2 write-after-write (different value),
// 3 atomic after another thread's plain write, 4 reference kept across __syncthreads.
[[noreturn]] void shared_race(int kind, const char* name, long long i, unsigned other);

// __syncthreads and its variants; returns the variant's result.
int barrier(Op op, int pred, const char* file, int line);
// A warp collective; returns this lane's result bits.
unsigned long long warp(Op op, unsigned mask, unsigned long long val, int param, int width, const char* file,
                        int line);
unsigned activemask();

// Runs a launch: checks the configuration, runs every block, waits (up to the time limit).
// Returns 0, or 1 with the message in err.
int run(const char* kernel, const DnDims* d, std::function<void()> body, char* err, size_t err_len);
// Writes a configuration error for `kernel` into err and returns 1.
int config_error(const char* kernel, char* err, size_t err_len, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));

}  // namespace dn
