// Host execution layer runtime: the worker pool, the per-block fiber scheduler, barriers and
// warp collectives, and the error reports. See dn_rt.h for the shared state and
// docs/host-layer.md for what is checked.

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dn_rt.h"

#if !defined(__x86_64__) || defined(DN_HOST_UCONTEXT)
#define DN_UCONTEXT 1
#include <ucontext.h>
#endif

namespace dn {

__thread Thread* tls_thread __attribute__((tls_model("initial-exec"))) = nullptr;
__thread Block* tls_block __attribute__((tls_model("initial-exec"))) = nullptr;
__thread const std::atomic<bool>* tls_abort __attribute__((tls_model("initial-exec"))) = nullptr;

// CUDA's launch limits, the same for every compute capability since 3.0 (MAX_THREADS, the most
// threads in a block, is in dn_rt.h).
constexpr unsigned MAX_BLOCK_XY = 1024;       // threads along a block's x and y axes
constexpr unsigned MAX_BLOCK_Z = 64;          // threads along a block's z axis
constexpr unsigned MAX_GRID_X = 2147483647u;  // blocks along the grid's x axis (2^31 - 1)
constexpr unsigned MAX_GRID_YZ = 65535;       // blocks along the grid's y and z axes
constexpr unsigned MAX_SHARED = 48 * 1024;    // dynamic shared memory per block without an opt-in

// The host layer's own sizes and defaults.
constexpr size_t STACK = 64 * 1024;           // a fiber's stack
constexpr size_t MSG = 1024;                  // an error message
constexpr size_t FULL_MSG = MSG + 256;        // an error message with its kernel, block and thread
constexpr unsigned DEFAULT_WORKERS = 8;       // pool threads without DENSENET_HOST_THREADS (or the cores)
constexpr long MAX_WORKERS = 64;              // most pool threads DENSENET_HOST_THREADS may ask for
constexpr double DEFAULT_TIMEOUT_MS = 20000;  // a launch's time limit without DENSENET_HOST_TIMEOUT_S

// One launch.
struct Job {
  const char* kernel = nullptr;
  DnDims d{};
  unsigned long long nblocks = 0;
  std::function<void()> body;
  std::atomic<unsigned long long> next{0};  // next unclaimed block
  std::atomic<bool> abort{false};
  std::mutex em;
  std::string error;  // the first error
  bool has_error = false;
  // Under the pool's mutex.
  unsigned active = 0;  // workers in the job
  bool removed = false, finished = false, leaked = false;
};

// A pool thread's resources: fiber stacks, the block's threads, shared memory and its shadow.
struct Worker {
  unsigned char* stacks = nullptr;
  size_t slot = 0;  // bytes per stack slot: a guard page, then the stack
  Thread th[MAX_THREADS];
  alignas(64) unsigned char shared[MAX_SHARED];
  Shadow shadow[MAX_SHARED / 4];
  uint32_t epoch = 0;
  unsigned free_stacks[MAX_THREADS];  // a LIFO of stack slots not in use
  unsigned nfree = 0;
  unsigned stack_of[MAX_THREADS];  // each started thread's slot
  Block blk{};
  void* sched_sp = nullptr;
#ifdef DN_UCONTEXT
  ucontext_t sched_uc;
  ucontext_t uc[MAX_THREADS];
#endif
  Worker() { memset(shadow, 0, sizeof shadow); }
  ~Worker() {
    if (stacks) munmap(stacks, slot * MAX_THREADS);
  }
  // Maps the stacks (once); false when the memory is not there.
  bool map_stacks() {
    if (stacks) return true;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    slot = page + STACK;
    void* p = mmap(nullptr, slot * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return false;
    stacks = static_cast<unsigned char*>(p);
    for (unsigned i = 0; i < MAX_THREADS; i++) mprotect(stacks + i * slot, page, PROT_NONE);
    return true;
  }
};

static __thread Worker* tls_worker __attribute__((tls_model("initial-exec"))) = nullptr;

// ---- context switches ----

#ifndef DN_UCONTEXT
// dn_rt_swap(save, next): saves the callee-saved registers on this stack and its stack pointer
// in *save, then resumes the context whose stack pointer is next.
extern "C" void dn_rt_swap(void** save, void* next);
asm(R"(
  .text
  .p2align 4
  .globl dn_rt_swap
  .hidden dn_rt_swap
  .type dn_rt_swap, @function
dn_rt_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dn_rt_swap, .-dn_rt_swap
)");
#endif

static void fiber_entry();

// Prepares thread i to start on stack slot `slot`.
static void ctx_init(Worker& w, unsigned i, unsigned slot) {
  unsigned char* top = w.stacks + (size_t)(slot + 1) * w.slot;
#ifdef DN_UCONTEXT
  getcontext(&w.uc[i]);
  w.uc[i].uc_stack.ss_sp = top - STACK;
  w.uc[i].uc_stack.ss_size = STACK;
  w.uc[i].uc_link = nullptr;
  makecontext(&w.uc[i], fiber_entry, 0);
  w.th[i].sp = &w.uc[i];  // started
#else
  // What dn_rt_swap pops: six registers, then the return address (fiber_entry, entered with the
  // stack aligned as after a call), above it a null return address for fiber_entry itself.
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_entry);
  for (int r = 0; r < 6; r++) *--sp = nullptr;
  w.th[i].sp = sp;
#endif
}

static inline void to_thread(Worker& w, unsigned i) {
  tls_thread = &w.th[i];
#ifdef DN_UCONTEXT
  swapcontext(&w.sched_uc, &w.uc[i]);
#else
  dn_rt_swap(&w.sched_sp, w.th[i].sp);
#endif
}

static inline void to_sched() {
  Worker& w = *tls_worker;
#ifdef DN_UCONTEXT
  swapcontext(&w.uc[tls_thread->lin], &w.sched_uc);
#else
  dn_rt_swap(&tls_thread->sp, w.sched_sp);
#endif
}

// ---- errors ----

static void set_error(Job& j, const char* msg) {
  {
    std::lock_guard<std::mutex> g(j.em);
    if (!j.has_error) {
      j.error = msg;
      j.has_error = true;
    }
  }
  j.abort.store(true);
}

// Leaves the block for good: back to the scheduler, which never resumes this fiber.
[[noreturn]] static void leave() {
  to_sched();
  ::abort();
}

static void thread_name(const Block& b, unsigned lin, char* out, size_t n) {
  snprintf(out, n, "(%u,%u,%u)", lin % b.dim.x, lin / b.dim.x % b.dim.y, lin / (b.dim.x * b.dim.y));
}

static void vblock_error(const char* fmt, va_list ap) {
  Block& b = *tls_block;
  char msg[MSG], full[FULL_MSG];
  vsnprintf(msg, sizeof msg, fmt, ap);
  snprintf(full, sizeof full, "kernel `%s`, block (%u,%u,%u): %s", b.kernel, b.idx.x, b.idx.y, b.idx.z, msg);
  set_error(*b.job, full);
}

// An error of the block as a whole (not of the current thread).
static void block_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static void block_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vblock_error(fmt, ap);
  va_end(ap);
}

void fail(const char* fmt, ...) {
  Block& b = *tls_block;
  Thread& t = *tls_thread;
  char msg[MSG], full[FULL_MSG];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  snprintf(full, sizeof full, "kernel `%s`, block (%u,%u,%u), thread (%u,%u,%u): %s", b.kernel, b.idx.x, b.idx.y,
           b.idx.z, t.tid.x, t.tid.y, t.tid.z, msg);
  set_error(*b.job, full);
  leave();
}

void abandon() { leave(); }

void buf_fail(int arg, size_t off, long long i, size_t len) {
  if (i >= 0 && (unsigned long long)i < len) abandon();  // in range: the launch was aborted
  if (off)
    fail("out-of-range index %lld into argument %d (a Buf view of %zu elements at offset %zu of the argument)", i,
         arg, len, off);
  fail("out-of-range index %lld into argument %d (a Buf of %zu elements)", i, arg, len);
}

void shared_oob(const char* name, long long i, unsigned long long count, unsigned elem_bytes) {
  fail("out-of-range index %lld into shared memory `%s` (%llu elements of %u bytes in the launch's %u shared bytes)", i,
       name, count, elem_bytes, tls_block->shared_bytes);
}

void shared_uninit(const char* name, long long i) {
  fail("read of shared memory `%s`[%lld] before any thread of the block wrote it", name, i);
}

void shared_race(int kind, const char* name, long long i, unsigned other) {
  char who[64];
  if (other == MULTI)
    snprintf(who, sizeof who, "other threads");
  else if (other == ATOMIC)
    snprintf(who, sizeof who, "atomics of other threads");
  else {
    char t[40];
    thread_name(*tls_block, other, t, sizeof t);
    snprintf(who, sizeof who, "thread %s", t);
  }
  switch (kind) {
    case 0:
      fail("read-after-write race without __syncthreads: reads shared `%s`[%lld], which %s wrote since the last "
           "barrier",
           name, i, who);
    case 1:
      fail("write-after-read race without __syncthreads: writes shared `%s`[%lld], which %s read since the last "
           "barrier",
           name, i, who);
    case 2:
      fail("write-after-write race without __syncthreads: writes shared `%s`[%lld] with another value than %s wrote "
           "since the last barrier",
           name, i, who);
    case 3:
      fail("race without __syncthreads between atomics and plain writes of shared `%s`[%lld] (%s, since the last "
           "barrier)",
           name, i, who);
    default:
      fail("a reference to shared `%s`[%lld] was kept across __syncthreads (copy the value: `T v = s[i];`, not "
           "`auto v = s[i];`)",
           name, i);
  }
}

// ---- describing a block's threads ----

static const char* op_name(Op op) {
  switch (op) {
    case Op::Sync: return "__syncthreads";
    case Op::SyncCount: return "__syncthreads_count";
    case Op::SyncAnd: return "__syncthreads_and";
    case Op::SyncOr: return "__syncthreads_or";
    case Op::ShflIdx: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
    case Op::SyncWarp: return "__syncwarp";
    case Op::RedAddI:
    case Op::RedAddU: return "__reduce_add_sync";
    case Op::RedMinI:
    case Op::RedMinU: return "__reduce_min_sync";
    case Op::RedMaxI:
    case Op::RedMaxU: return "__reduce_max_sync";
  }
  return "?";
}

static bool same_site(const Thread& a, const Thread& b) {
  return a.st == b.st &&
         (a.st == St::Exited || a.st == St::Ready ||
          (a.op == b.op && a.line == b.line && (a.file == b.file || strcmp(a.file, b.file) == 0)));
}

// "threads 0-127 wait at __syncthreads (kernels/x.cu:12); threads 128-255 have exited", grouping
// the block's threads (linear ids) by where they stand.
static std::string describe(const Block& b) {
  struct Group {
    unsigned first;  // a member, for the site
    std::vector<std::pair<unsigned, unsigned>> ranges;
    unsigned count;
  };
  std::vector<Group> gs;
  for (unsigned i = 0; i < b.nthreads; i++) {
    const Thread& t = b.th[i];
    Group* g = nullptr;
    for (auto& x : gs)
      if (same_site(b.th[x.first], t)) g = &x;
    if (!g) {
      gs.push_back(Group{i, {}, 0});
      g = &gs.back();
    }
    g->count++;
    if (!g->ranges.empty() && g->ranges.back().second + 1 == i)
      g->ranges.back().second = i;
    else
      g->ranges.push_back({i, i});
  }
  std::string s;
  char buf[256];
  for (auto& g : gs) {
    if (!s.empty()) s += "; ";
    s += g.count == 1 ? "thread " : "threads ";
    for (size_t r = 0; r < g.ranges.size() && r < 6; r++) {
      if (r) s += ",";
      if (g.ranges[r].first == g.ranges[r].second)
        snprintf(buf, sizeof buf, "%u", g.ranges[r].first);
      else
        snprintf(buf, sizeof buf, "%u-%u", g.ranges[r].first, g.ranges[r].second);
      s += buf;
    }
    if (g.ranges.size() > 6) s += ",...";
    const Thread& t = b.th[g.first];
    switch (t.st) {
      case St::Exited: s += g.count == 1 ? " has exited" : " have exited"; break;
      case St::Ready: s += g.count == 1 ? " is running" : " are running"; break;
      default: snprintf(buf, sizeof buf, " at %s (%s:%d)", op_name(t.op), t.file, t.line); s += buf;
    }
  }
  return s;
}

// ---- barriers ----

static void complete_barrier(Block& b) {
  const Thread& a = b.th[0];
  for (unsigned i = 1; i < b.nthreads; i++)
    if (!same_site(a, b.th[i])) {
      block_error("divergent __syncthreads: the block's threads wait at different barriers: %s (linear thread ids)",
                  describe(b).c_str());
      leave();
    }
  unsigned count = 0;
  for (unsigned i = 0; i < b.nthreads; i++) count += b.th[i].val != 0;
  unsigned long long res = a.op == Op::SyncCount ? count
                           : a.op == Op::SyncAnd ? count == b.nthreads
                           : a.op == Op::SyncOr  ? count > 0
                                                 : 0;
  for (unsigned i = 0; i < b.nthreads; i++) {
    b.th[i].st = St::Ready;
    b.th[i].res = res;
  }
  b.arrived = 0;
  b.epoch++;
}

int barrier(Op op, int pred, const char* file, int line) {
  Block& b = *tls_block;
  Thread& t = *tls_thread;
  t.st = St::Barrier;
  t.op = op;
  t.val = pred != 0;
  t.file = file;
  t.line = line;
  if (++b.arrived == b.nthreads) complete_barrier(b);
  to_sched();
  return (int)t.res;
}

// ---- warp collectives ----

// The lane a shuffle reads, as PTX's shfl.sync defines it (c = ((32 - width) << 8) | 31, or
// (32 - width) << 8 for up).
static unsigned shfl_src(Op op, unsigned lane, int param, int width) {
  int l = (int)lane, bv = param & 31, seg = (32 - width) & 31;
  int minl = l & seg, maxl = op == Op::ShflUp ? minl : (minl | (31 & ~seg));
  int j = l;
  bool p = false;
  switch (op) {
    case Op::ShflUp: j = l - bv; p = j >= maxl; break;
    case Op::ShflDown: j = l + bv; p = j <= maxl; break;
    case Op::ShflXor: j = l ^ bv; p = j <= maxl; break;
    default: j = minl | (bv & ~seg); p = j <= maxl; break;
  }
  return p ? (unsigned)j : lane;
}

static const char* site(const Thread& t, char* buf, size_t n) {
  snprintf(buf, n, "%s (%s:%d) with mask 0x%08x", op_name(t.op), t.file, t.line, t.mask);
  return buf;
}

// Completes the collective of `ref`'s group in `warp` (lanes in `mask`) if every lane of the mask
// has arrived or exited.
static void try_complete(Block& b, unsigned warp, unsigned mask, const Thread& ref) {
  unsigned base = warp * 32, part = 0;
  for (unsigned lane = 0; lane < 32; lane++) {
    if (!(mask >> lane & 1) || base + lane >= b.nthreads) continue;
    const Thread& x = b.th[base + lane];
    if (x.st == St::Exited) continue;
    if (x.st != St::Warp) return;  // not there yet
    if (x.mask != mask || x.op != ref.op || x.width != ref.width) {
      char s1[256], s2[256], t1[40], t2[40];
      thread_name(b, ref.lin, t1, sizeof t1);
      thread_name(b, x.lin, t2, sizeof t2);
      char w[64] = "";
      if (x.width != ref.width) snprintf(w, sizeof w, " (widths %d and %d)", ref.width, x.width);
      block_error("divergent warp collectives in warp %u: thread %s (lane %u) is at %s, thread %s (lane %u) at %s%s",
                  warp, t1, ref.lin & 31, site(ref, s1, sizeof s1), t2, lane, site(x, s2, sizeof s2), w);
      leave();
    }
    part |= 1u << lane;
  }
  if (!part) return;
  Thread* th = b.th + base;
  switch (ref.op) {
    case Op::ShflIdx:
    case Op::ShflUp:
    case Op::ShflDown:
    case Op::ShflXor:
      for (unsigned lane = 0; lane < 32; lane++) {
        if (!(part >> lane & 1)) continue;
        unsigned src = shfl_src(ref.op, lane, th[lane].param, th[lane].width);
        if (!(part >> src & 1)) {
          char s[256], t[40];
          thread_name(b, base + lane, t, sizeof t);
          const char* why = !(mask >> src & 1)         ? "is not in the mask"
                            : base + src >= b.nthreads ? "does not exist (the block's last warp is partial)"
                                                       : "has exited";
          block_error("thread %s (lane %u of warp %u) at %s reads lane %u, which %s", t, lane, warp,
                      site(th[lane], s, sizeof s), src, why);
          leave();
        }
        th[lane].res = th[src].val;
      }
      break;
    default: {
      unsigned bits = 0;
      unsigned long long acc = 0;
      bool first = true;
      for (unsigned lane = 0; lane < 32; lane++) {
        if (!(part >> lane & 1)) continue;
        unsigned long long v = th[lane].val;
        bits |= (unsigned)(v != 0) << lane;
        unsigned u = (unsigned)v;
        int si = (int)u, sa = (int)(unsigned)acc;
        switch (ref.op) {
          case Op::RedAddI:
          case Op::RedAddU: acc = (unsigned)((unsigned)acc + u); break;
          case Op::RedMinI: acc = first || si < sa ? u : acc; break;
          case Op::RedMaxI: acc = first || si > sa ? u : acc; break;
          case Op::RedMinU: acc = first || u < (unsigned)acc ? u : acc; break;
          case Op::RedMaxU: acc = first || u > (unsigned)acc ? u : acc; break;
          default: break;
        }
        first = false;
      }
      unsigned long long res = ref.op == Op::Ballot ? bits
                               : ref.op == Op::Any  ? bits != 0
                               : ref.op == Op::All  ? bits == part
                               : ref.op == Op::SyncWarp ? 0
                                                        : acc;
      for (unsigned lane = 0; lane < 32; lane++)
        if (part >> lane & 1) th[lane].res = res;
    }
  }
  for (unsigned lane = 0; lane < 32; lane++)
    if (part >> lane & 1) th[lane].st = St::Ready;
  b.wwaiting[warp] -= (unsigned)__builtin_popcount(part);
  b.wgen[warp]++;
}

unsigned long long warp(Op op, unsigned mask, unsigned long long val, int param, int width, const char* file,
                        int line) {
  Block& b = *tls_block;
  Thread& t = *tls_thread;
  unsigned lane = t.lin & 31;
  if (!(mask >> lane & 1))
    fail("%s (%s:%d) with mask 0x%08x, which does not include the calling lane %u", op_name(op), file, line, mask,
         lane);
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("%s (%s:%d) with width %d (a power of 2 up to 32)", op_name(op), file, line, width);
  t.st = St::Warp;
  t.op = op;
  t.mask = mask;
  t.val = val;
  t.param = param;
  t.width = (uint8_t)width;
  t.file = file;
  t.line = line;
  b.wwaiting[t.lin >> 5]++;
  try_complete(b, t.lin >> 5, mask, t);
  to_sched();
  return t.res;
}

unsigned activemask() {
  Block& b = *tls_block;
  unsigned base = tls_thread->lin & ~31u, m = 0;
  for (unsigned lane = 0; lane < 32 && base + lane < b.nthreads; lane++)
    if (b.th[base + lane].st != St::Exited) m |= 1u << lane;
  return m;
}

// ---- the block scheduler ----

[[noreturn]] static void thread_exit() {
  Block& b = *tls_block;
  Thread& t = *tls_thread;
  t.st = St::Exited;
  b.exited++;
  unsigned base = t.lin & ~31u, lane = t.lin & 31;
  for (unsigned l = 0; b.wwaiting[t.lin >> 5] && l < 32 && base + l < b.nthreads; l++) {
    Thread& x = b.th[base + l];
    if (x.st == St::Warp && (x.mask >> lane & 1)) try_complete(b, t.lin >> 5, x.mask, x);
  }
  leave();
}

static void fiber_entry() {
  tls_block->job->body();
  thread_exit();
}

// Runs block `lin` of job j: the threads in ascending order on even blocks, descending on odd
// ones, each until it waits, exits or fails; repeated until all exited, the launch is aborted, or
// none can go on (a deadlock).
static void run_block(Worker& w, Job& j, unsigned long long lin) {
  Block& b = w.blk;
  const DnDims& d = j.d;
  b.job = &j;
  b.kernel = j.kernel;
  b.grid = Idx3{d.grid[0], d.grid[1], d.grid[2]};
  b.dim = Idx3{d.block[0], d.block[1], d.block[2]};
  b.lin = lin;
  b.idx = Idx3{(unsigned)(lin % d.grid[0]), (unsigned)(lin / d.grid[0] % d.grid[1]),
               (unsigned)(lin / ((unsigned long long)d.grid[0] * d.grid[1]))};
  unsigned n = d.block[0] * d.block[1] * d.block[2];
  b.nthreads = n;
  b.exited = 0;
  b.arrived = 0;
  b.th = w.th;
  b.shared = w.shared;
  b.shared_bytes = d.shared;
  b.shadow = w.shadow;
  if (w.epoch > 0xf0000000u) {
    memset(w.shadow, 0, sizeof w.shadow);
    w.epoch = 0;
  }
  b.epoch_base = b.epoch = ++w.epoch;
  memset(b.wgen, 0, sizeof b.wgen);
  memset(b.wwaiting, 0, sizeof b.wwaiting);
  Idx3 tid{0, 0, 0};
  for (unsigned i = 0; i < n; i++) {
    Thread& t = w.th[i];
    t.tid = tid;
    if (++tid.x == b.dim.x) {
      tid.x = 0;
      if (++tid.y == b.dim.y) {
        tid.y = 0;
        tid.z++;
      }
    }
    t.lin = i;
    t.st = St::Ready;
    t.sp = nullptr;  // not started
    t.res = 0;
  }
  // Stacks are taken when a thread starts and given back when it exits, so threads that run to
  // the end without waiting all reuse one (cache-hot) stack.
  w.nfree = MAX_THREADS;
  for (unsigned k = 0; k < MAX_THREADS; k++) w.free_stacks[k] = MAX_THREADS - 1 - k;
  tls_block = &b;
  bool asc = lin % 2 == 0;
  for (;;) {
    bool ran = false;
    for (unsigned k = 0; k < n; k++) {
      unsigned i = asc ? k : n - 1 - k;
      Thread& t = w.th[i];
      if (t.st != St::Ready) continue;
      if (j.abort.load(std::memory_order_relaxed)) goto out;
      ran = true;
      if (!t.sp) {
        w.stack_of[i] = w.free_stacks[--w.nfree];
        ctx_init(w, i, w.stack_of[i]);
      }
      to_thread(w, i);
      if (t.st == St::Exited) w.free_stacks[w.nfree++] = w.stack_of[i];
    }
    if (j.abort.load(std::memory_order_relaxed) || b.exited == n) break;
    if (!ran) {
      tls_thread = nullptr;
      block_error("deadlock: %s (linear thread ids; every thread of a block must reach each __syncthreads, and every "
                  "lane of a warp collective's mask must reach it or exit)",
                  describe(b).c_str());
      break;
    }
  }
out:
  tls_thread = nullptr;
  w.epoch = b.epoch;
}

// ---- the pool ----

struct Pool {
  std::mutex m;
  std::condition_variable work_cv, done_cv;
  std::deque<std::shared_ptr<Job>> q;
  unsigned workers = 0;
};

static Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: detached workers may outlive main
  return *p;
}

static void worker_main() {
  std::unique_ptr<Worker> w(new Worker);
  tls_worker = w.get();
  Pool& p = pool();
  std::unique_lock<std::mutex> lk(p.m);
  for (;;) {
    if (p.q.empty()) {
      p.work_cv.wait(lk);
      continue;
    }
    std::shared_ptr<Job> j = p.q.front();
    j->active++;
    lk.unlock();
    tls_abort = &j->abort;
    if (!w->map_stacks()) {
      char msg[MSG];
      snprintf(msg, sizeof msg, "kernel `%s`: cannot map the host layer's fiber stacks", j->kernel);
      set_error(*j, msg);
    }
    while (!j->abort.load(std::memory_order_relaxed)) {
      unsigned long long b = j->next.fetch_add(1);
      if (b >= j->nblocks) break;
      run_block(*w, *j, b);
    }
    tls_abort = nullptr;
    lk.lock();
    if (!j->removed) {
      p.q.erase(std::find(p.q.begin(), p.q.end(), j));
      j->removed = true;
    }
    if (--j->active == 0) {
      j->finished = true;
      p.done_cv.notify_all();
    }
    if (j->leaked) {
      p.workers--;  // a replacement was started when this one was stuck
      return;
    }
  }
}

// Starts n workers (under the pool's mutex); false if the OS refused a thread.
static bool spawn(Pool& p, unsigned n) {
  for (unsigned i = 0; i < n; i++) {
    try {
      std::thread(worker_main).detach();
      p.workers++;
    } catch (...) {
      return false;
    }
  }
  return true;
}

static unsigned pool_size() {
  const char* e = getenv("DENSENET_HOST_THREADS");
  long n = e ? strtol(e, nullptr, 10) : 0;
  if (n <= 0) n = (long)std::min(std::thread::hardware_concurrency(), DEFAULT_WORKERS);
  return (unsigned)std::max(1L, std::min(n, MAX_WORKERS));
}

static double timeout_ms(const DnDims* d) {
  if (d->timeout_ms) return d->timeout_ms;
  const char* e = getenv("DENSENET_HOST_TIMEOUT_S");
  double s = e ? strtod(e, nullptr) : 0;
  return s > 0 ? s * 1000 : DEFAULT_TIMEOUT_MS;
}

int config_error(const char* kernel, char* err, size_t err_len, const char* fmt, ...) {
  char msg[MSG];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (err && err_len) snprintf(err, err_len, "kernel `%s`: %s", kernel, msg);
  return 1;
}

int run(const char* kernel, const DnDims* d, std::function<void()> body, char* err, size_t err_len) {
  if (err && err_len) err[0] = 0;
  const unsigned *g = d->grid, *bl = d->block;
  if (!g[0] || !g[1] || !g[2])
    return config_error(kernel, err, err_len, "grid (%u,%u,%u) has a zero dimension", g[0], g[1], g[2]);
  if (!bl[0] || !bl[1] || !bl[2])
    return config_error(kernel, err, err_len, "block (%u,%u,%u) has a zero dimension", bl[0], bl[1], bl[2]);
  unsigned long long threads = (unsigned long long)bl[0] * bl[1] * bl[2];
  if (bl[0] > MAX_BLOCK_XY || bl[1] > MAX_BLOCK_XY || bl[2] > MAX_BLOCK_Z || threads > MAX_THREADS)
    return config_error(kernel, err, err_len,
                        "block (%u,%u,%u) exceeds CUDA's limits (%llu threads; at most 1024, x and y up to 1024, z "
                        "up to 64)",
                        bl[0], bl[1], bl[2], threads);
  if (g[0] > MAX_GRID_X || g[1] > MAX_GRID_YZ || g[2] > MAX_GRID_YZ)
    return config_error(kernel, err, err_len, "grid (%u,%u,%u) exceeds CUDA's limits (x < 2^31, y and z up to 65535)",
                        g[0], g[1], g[2]);
  if (d->shared > MAX_SHARED)
    return config_error(kernel, err, err_len,
                        "%u bytes of dynamic shared memory exceed 48 KiB (49152 bytes), the limit without an opt-in "
                        "(cudaFuncSetAttribute)",
                        d->shared);
  auto j = std::make_shared<Job>();
  j->kernel = kernel;
  j->d = *d;
  j->nblocks = (unsigned long long)g[0] * g[1] * g[2];
  j->body = std::move(body);
  double ms = timeout_ms(d);
  Pool& p = pool();
  {
    std::unique_lock<std::mutex> lk(p.m);
    if (p.workers == 0 && !spawn(p, pool_size()) && p.workers == 0)
      return config_error(kernel, err, err_len, "cannot start the host layer's worker threads");
    p.q.push_back(j);
    p.work_cv.notify_all();
    auto deadline = std::chrono::steady_clock::now() +
                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                        std::chrono::duration<double, std::milli>(ms));
    if (!p.done_cv.wait_until(lk, deadline, [&] { return j->finished; })) {
      j->abort.store(true);
      if (!j->removed) {
        p.q.erase(std::find(p.q.begin(), p.q.end(), j));
        j->removed = true;
      }
      if (j->active == 0) j->finished = true;
      char msg[MSG];
      if (j->next.load() == 0)
        snprintf(msg, sizeof msg,
                 "kernel `%s`: the launch did not start within the host layer's time limit of %g s "
                 "(DENSENET_HOST_TIMEOUT_S): its workers were busy with other launches",
                 kernel, ms / 1000);
      else
        snprintf(msg, sizeof msg,
                 "kernel `%s`: the launch (grid (%u,%u,%u), block (%u,%u,%u)) ran past the host layer's time limit "
                 "of %g s (DENSENET_HOST_TIMEOUT_S): an infinite loop, or a wait for another block?",
                 kernel, g[0], g[1], g[2], bl[0], bl[1], bl[2], ms / 1000);
      set_error(*j, msg);
      // Workers leave at their next Buf or shared access, barrier or collective; one that does
      // none of those is left behind, and replaced.
      if (!p.done_cv.wait_for(lk, std::chrono::seconds(1), [&] { return j->finished; })) {
        j->leaked = true;
        spawn(p, j->active);
      }
    }
  }
  std::lock_guard<std::mutex> lg(j->em);
  if (!j->has_error) return 0;
  if (err && err_len) snprintf(err, err_len, "%s", j->error.c_str());
  return 1;
}

}  // namespace dn
