//! The host execution layer itself (kernels/host/, docs/host-layer.md): correct kernels give the
//! values computed here, and each deliberately broken kernel of kernels/host/tests/broken.cu
//! fails its launch with a message naming the problem, never hanging or passing silently.

use std::time::{Duration, Instant};

use super::launch_with;
use crate::backend::cuda::{Arg, Launch};
use crate::backend::Span;
use crate::Result;

/// Runs `l` on the host execution layer over `arena` (4-byte words). The time limit is
/// `$DENSENET_HOST_TIMEOUT_S`, else the layer's default.
fn host_launch(arena: &mut [u32], l: &Launch) -> Result<()> {
    launch_with(bytemuck::cast_slice_mut(arena), l, None)
}

/// [`host_launch`] with the time limit `timeout`.
fn host_launch_timeout(arena: &mut [u32], l: &Launch, timeout: Duration) -> Result<()> {
    launch_with(bytemuck::cast_slice_mut(arena), l, Some(timeout))
}

/// A kernel and the launch configuration a test gives it.
#[derive(Clone, Copy)]
struct Kernel {
    name: &'static str,
    grid: [u32; 3],
    block: [u32; 3],
    shared: u32,
}

impl Kernel {
    fn launch<'a>(&self, args: &'a [Arg]) -> Launch<'a> {
        Launch { kernel: self.name, grid: self.grid, block: self.block, shared: self.shared, args }
    }

    fn run(&self, arena: &mut [u32], args: &[Arg]) -> Result<()> {
        host_launch(arena, &self.launch(args))
    }

    /// Launches with `args` over an arena of `len` words, which must fail with a message that
    /// matches `want`: fragments separated by " … ", each found after the one before.
    fn error(&self, len: usize, args: &[Arg], want: &str) {
        let msg = match self.run(&mut vec![0; len], args) {
            Ok(()) => panic!("{} launched without an error", self.name),
            Err(m) => m.0,
        };
        let mut rest = msg.as_str();
        for part in want.split(" … ") {
            let Some(at) = rest.find(part) else { panic!("the message lacks {part:?} (in this order): {msg}") };
            rest = &rest[at + part.len()..];
        }
    }

    /// Launches a broken kernel `(Buf<float> y, int mode)` in each mode, `y` an arena of `len`
    /// floats: mode i must fail with a message that matches `wants[i]`.
    fn modes(&self, len: usize, wants: &[&str]) {
        for (mode, want) in wants.iter().enumerate() {
            self.error(len, &[buf(0, len), Arg::I32(mode as i32)], want);
        }
    }
}

fn buf(off: usize, len: usize) -> Arg {
    Arg::Buf(Span::f32(4 * off, len))
}

fn floats(arena: &[u32]) -> Vec<f32> {
    arena.iter().map(|&w| f32::from_bits(w)).collect()
}

#[test]
fn block_reduction_sums_every_block() {
    let (blocks, threads) = (64usize, 256usize);
    let n = blocks * threads - 100; // the last block is partial
    let mut arena = vec![0u32; blocks * threads + blocks];
    for (i, w) in arena[..n].iter_mut().enumerate() {
        *w = ((i % 7) as f32 - 2.5).to_bits();
    }
    let k =
        Kernel { name: "hosttest_block_sum", grid: [blocks as u32, 1, 1], block: [threads as u32, 1, 1], shared: 1024 };
    k.run(&mut arena, &[buf(0, n), buf(blocks * threads, blocks), Arg::I32(n as i32)]).unwrap();
    let out = floats(&arena[blocks * threads..]);
    for (b, &got) in out.iter().enumerate() {
        let want: f32 = (b * threads..((b + 1) * threads).min(n)).map(|i| (i % 7) as f32 - 2.5).sum();
        assert_eq!(got, want, "block {b}");
    }
}

#[test]
fn barriers_are_real() {
    let (blocks, threads, rounds) = (64usize, 256usize, 5);
    let mut arena = vec![0u32; blocks * threads];
    let k =
        Kernel { name: "hosttest_barriers", grid: [blocks as u32, 1, 1], block: [threads as u32, 1, 1], shared: 1024 };
    k.run(&mut arena, &[buf(0, blocks * threads), Arg::I32(rounds)]).unwrap();
    // The same rounds, sequentially.
    let mut s: Vec<f32> = (0..threads).map(|t| t as f32).collect();
    let mut acc = vec![0.0f32; threads];
    for _ in 0..rounds {
        let v: Vec<f32> = (0..threads).map(|t| s[(t + 1) % threads]).collect();
        for t in 0..threads {
            s[t] = v[t] + 1.0;
            acc[t] += v[t];
        }
    }
    let y = floats(&arena);
    for b in 0..blocks {
        assert_eq!(&y[b * threads..(b + 1) * threads], &acc[..], "block {b}");
    }
}

#[test]
fn warp_collectives_follow_cuda() {
    let (blocks, threads) = (2usize, 64usize);
    let total = blocks * threads;
    let x: Vec<i32> = (0..total).map(|i| if i == 70 { 5000 } else { ((i * 37 + 11) % 100) as i32 }).collect();
    let mut arena = vec![0u32; total + total * 16];
    for (i, &v) in x.iter().enumerate() {
        arena[i] = v as u32;
    }
    let k = Kernel { name: "hosttest_warp", grid: [blocks as u32, 1, 1], block: [threads as u32, 1, 1], shared: 0 };
    k.run(&mut arena, &[buf(0, total), buf(total, total * 16)]).unwrap();
    for g in 0..total {
        let (lane, warp0, block0) = (g % 32, g - g % 32, g - g % threads);
        let xl = |l: usize| x[warp0 + l];
        let warp = &x[warp0..warp0 + 32];
        let block = &x[block0..block0 + threads];
        let ballot = (0..32).filter(|&l| xl(l) % 3 == 0).fold(0u32, |m, l| m | 1 << l);
        let want = [
            if lane + 3 < 32 { xl(lane + 3) } else { xl(lane) },
            if lane >= 5 { xl(lane - 5) } else { xl(lane) },
            xl(lane ^ 6),
            xl((lane & 16) | 7),
            if lane % 8 + 2 < 8 { xl(lane + 2) } else { xl(lane) },
            ballot as i32,
            warp.iter().any(|&v| v > 1000) as i32,
            warp.iter().all(|&v| v >= 0) as i32,
            warp.iter().all(|&v| v < 1000) as i32,
            warp.iter().sum(),
            *warp.iter().max().unwrap(),
            ((xl(lane ^ 1) as f32 * 0.5) as i32) * 2,
            block.iter().filter(|&&v| v % 2 == 0).count() as i32,
            block.iter().any(|&v| v > 1000) as i32,
            block.iter().all(|&v| v > 1000) as i32,
            xl((lane & 16) + 15),
        ];
        let got: Vec<i32> = arena[total + g * 16..total + g * 16 + 16].iter().map(|&w| w as i32).collect();
        assert_eq!(got, want, "thread {g}");
    }
}

#[test]
fn atomics_across_blocks() {
    let (blocks, threads) = (64u32, 128u32);
    let mut arena = vec![0u32; 5];
    arena[2] = (-1i32) as u32;
    let k = Kernel { name: "hosttest_atomics", grid: [blocks, 1, 1], block: [threads, 1, 1], shared: 4 };
    k.run(&mut arena, &[buf(0, 2), buf(2, 1), buf(3, 1), buf(4, 1)]).unwrap();
    let n = blocks * threads;
    assert_eq!(arena[0] as i32, n as i32);
    assert_eq!(arena[1] as i32, n as i32, "shared atomics, summed per block");
    assert_eq!(arena[2] as i32, n as i32 - 1);
    assert_eq!(f32::from_bits(arena[3]), n as f32);
    assert_eq!(arena[4], 2 * n);
}

#[test]
fn two_dimensional_grids_and_blocks() {
    let (w, h) = (40usize, 13usize);
    let mut arena = vec![0u32; w * h];
    let k = Kernel { name: "hosttest_grid2d", grid: [3, 2, 1], block: [16, 8, 1], shared: 0 };
    k.run(&mut arena, &[buf(0, w * h), Arg::I32(w as i32), Arg::I32(h as i32)]).unwrap();
    let y = floats(&arena);
    for r in 0..h {
        for c in 0..w {
            assert_eq!(y[r * w + c], (r * 1000 + c) as f32);
        }
    }
}

#[test]
fn missing_barrier_is_caught_in_both_schedule_orders() {
    let k = Kernel { name: "hosttest_missing_barrier", grid: [2, 1, 1], block: [256, 1, 1], shared: 1024 };
    for (only, want) in [
        // Block 0 runs its threads in ascending order: thread 1 overwrites the cell thread 0 read.
        (
            0,
            "kernel `hosttest_missing_barrier` … block (0,0,0) … write-after-read race without __syncthreads \
             … shared `s`[1] … thread (0,0,0)",
        ),
        // Block 1 runs them descending: thread 254 reads the cell thread 255 just wrote.
        (
            1,
            "block (1,0,0) … thread (254,0,0) … read-after-write race without __syncthreads … shared `s`[255] \
             … thread (255,0,0) wrote",
        ),
    ] {
        k.error(512, &[buf(0, 256), buf(256, 256), Arg::U32(only)], want);
    }
}

#[test]
fn divergent_barriers_are_errors_not_hangs() {
    let k = Kernel { name: "hosttest_divergent_barrier", grid: [1, 1, 1], block: [256, 1, 1], shared: 0 };
    // The block scheduler finds that no thread can go on. A hang would end at the launch's time
    // limit with that limit's message instead, which these checks reject: they are on what the
    // launch reports, not on how long it took.
    k.modes(
        256,
        &[
            "kernel `hosttest_divergent_barrier` … deadlock … threads 0-127 at __syncthreads \
             (kernels/host/tests/broken.cu:22) … threads 128-255 have exited",
            "divergent __syncthreads … threads 0-127 at __syncthreads (kernels/host/tests/broken.cu:25) \
             … threads 128-255 at __syncthreads (kernels/host/tests/broken.cu:27)",
            "deadlock … threads 0-15,32-47 … at __shfl_xor_sync … threads 16-31,48-63 … at __syncthreads",
        ],
    );
}

#[test]
fn out_of_range_global_index() {
    let k = Kernel { name: "hosttest_global_oob", grid: [2, 1, 1], block: [128, 1, 1], shared: 0 };
    for (view, want) in [
        (
            0,
            "kernel `hosttest_global_oob` … block (1,0,0) … thread (127,0,0) … out-of-range index 255 into \
             argument 0 … a Buf of 200 elements",
        ),
        (50, "out-of-range index 255 into argument 0 … 150 elements at offset 50"),
    ] {
        k.error(200, &[buf(0, 200), Arg::I32(view)], want);
    }
}

#[test]
fn out_of_range_shared_index() {
    let k = Kernel { name: "hosttest_shared_oob", grid: [1, 1, 1], block: [256, 1, 1], shared: 1024 };
    let want = "thread (255,0,0) … out-of-range index 256 into shared memory `s` … 256 elements of 4 bytes \
                … 1024 shared bytes";
    k.error(256, &[buf(0, 256)], want);
}

#[test]
fn uninitialized_shared_read() {
    let k = Kernel { name: "hosttest_shared_uninit", grid: [1, 1, 1], block: [256, 1, 1], shared: 1024 };
    k.error(
        256,
        &[buf(0, 256)],
        "thread (0,0,0) … read of shared memory `s`[1] before any thread of the block wrote it",
    );
}

#[test]
fn shared_write_conflicts_and_stale_references() {
    let mut arena = vec![0u32; 256];
    let k = Kernel { name: "hosttest_shared_misc", grid: [1, 1, 1], block: [256, 1, 1], shared: 1024 };
    for (mode, want) in [
        (0, "thread (1,0,0) … write-after-write race without __syncthreads … shared `s`[0] … thread (0,0,0)"),
        (2, "kept across __syncthreads"),
        (3, "read-after-write race without __syncthreads … atomics of other threads"),
    ] {
        k.error(256, &[buf(0, 256), Arg::I32(mode)], want);
    }
    k.run(&mut arena, &[buf(0, 256), Arg::I32(1)]).expect("equal values may be written by several threads");
    assert!(floats(&arena).iter().all(|&v| v == 1.0));
}

#[test]
fn infinite_loop_hits_the_time_limit() {
    let mut arena = vec![0u32; 2];
    let spin = Kernel { name: "hosttest_spin", grid: [4, 1, 1], block: [32, 1, 1], shared: 0 };
    let limit = Duration::from_millis(300);
    let t = Instant::now();
    let msg = host_launch_timeout(&mut arena, &spin.launch(&[buf(0, 2)]), limit).unwrap_err().0;
    assert!(msg.contains("kernel `hosttest_spin`") && msg.contains("time limit of 0.3 s"), "{msg}");
    // The launch ran until its limit. No bound above: a launch that ignored the limit would never
    // return, and how soon after the limit one returns depends on the machine's load.
    assert!(t.elapsed() >= limit, "the launch ended {:?} after it started, before its limit", t.elapsed());
    // The pool is usable afterwards.
    let mut arena = vec![0u32; 4];
    let grid2d = Kernel { name: "hosttest_grid2d", grid: [1, 1, 1], block: [2, 2, 1], shared: 0 };
    grid2d.run(&mut arena, &[buf(0, 4), Arg::I32(2), Arg::I32(2)]).unwrap();
    assert_eq!(floats(&arena), [0.0, 1.0, 1000.0, 1001.0]);
}

#[test]
fn warp_collective_misuse() {
    let k = Kernel { name: "hosttest_warp_misuse", grid: [1, 1, 1], block: [48, 1, 1], shared: 0 };
    k.modes(
        64,
        &[
            "thread (32,0,0) (lane 0 of warp 1) … __shfl_down_sync … reads lane 16, which does not exist",
            "thread (1,0,0) … __ballot_sync … mask 0x00000001, which does not include the calling lane 1",
            "divergent warp collectives in warp 0 … mask 0xffffffff … mask 0x55555555",
        ],
    );
}

#[test]
fn arguments_must_match_the_kernel() {
    let k = Kernel { name: "hosttest_block_sum", grid: [1, 1, 1], block: [256, 1, 1], shared: 1024 };
    for (args, want) in [
        (&[buf(0, 256), buf(256, 1)][..], "kernel `hosttest_block_sum` … takes 3 arguments, the launch passes 2"),
        (&[buf(0, 256), buf(256, 1), Arg::F32(1.0)], "argument 2: the kernel takes int, the launch passes F32"),
        (&[Arg::U64(0), buf(256, 1), Arg::I32(1)], "argument 0: the kernel takes Buf … the launch passes U64"),
        (&[buf(0, 256), buf(256, 45), Arg::I32(1)], "argument 1 … outside the arena of 1200 bytes"),
    ] {
        k.error(300, args, want);
    }
    let missing = Kernel { name: "no_such_kernel", grid: [1, 1, 1], block: [1, 1, 1], shared: 0 };
    missing.error(300, &[], "kernel `no_such_kernel` … no such __global__");
}

#[test]
fn launch_configuration_limits() {
    let args = [buf(0, 2048), buf(2048, 8), Arg::I32(2048)];
    for (grid, block, shared, want) in [
        ([1, 1, 1], [2048, 1, 1], 0, "block (2048,1,1) … at most 1024"),
        ([1, 1, 1], [64, 64, 1], 0, "4096 threads"),
        ([1, 1, 1], [256, 1, 1], 64 * 1024, "65536 bytes of dynamic shared memory exceed 48 KiB"),
        ([0, 1, 1], [256, 1, 1], 1024, "grid (0,1,1) has a zero dimension"),
        ([1, 1, 1], [256, 0, 1], 1024, "block (256,0,1) has a zero dimension"),
        ([1, 70000, 1], [256, 1, 1], 1024, "exceeds CUDA's limits"),
    ] {
        Kernel { name: "hosttest_block_sum", grid, block, shared }.error(4096, &args, want);
    }
}

/// The kernels' 16-bit storage types (kernels/dn.cuh) widen every bf16 and f16 pattern and
/// round f32 values (`crate::elem::awkward`: ties both ways, subnormals, overflow, NaN,
/// random bits) as the `half` crate does, bit for bit (any NaN for a NaN): the values the CPU
/// backend stores.
#[test]
fn storage_types_convert_as_the_cpu_does() {
    use crate::backend::DType;
    use crate::elem::Elem;
    fn check<T: Elem + PartialEq + std::fmt::Debug>(kernel: &'static str, dtype: DType, from_bits: fn(u16) -> T) {
        let values = crate::elem::awkward();
        let (n_bits, n) = (1usize << 16, values.len());
        // Words: the patterns (two a word), their widening, the values, their narrowing, their rounding.
        let (widened, at_values) = (n_bits / 2, n_bits / 2 + n_bits);
        let (narrowed, rounded) = (at_values + n, at_values + n + n.div_ceil(2));
        let mut arena = vec![0u32; rounded + n];
        for (i, w) in arena[..n_bits / 2].iter_mut().enumerate() {
            *w = (2 * i as u32) | ((2 * i as u32 + 1) << 16);
        }
        for (w, v) in arena[at_values..].iter_mut().zip(&values) {
            *w = v.to_bits();
        }
        let half = |off: usize, len: usize| Arg::Buf(Span { off: 4 * off, len, dtype, tag: 0 });
        let threads = 256;
        let k = Kernel {
            name: kernel,
            grid: [n_bits.max(n).div_ceil(threads) as u32, 1, 1],
            block: [threads as u32, 1, 1],
            shared: 0,
        };
        let args = [
            half(0, n_bits),
            buf(widened, n_bits),
            Arg::I32(n_bits as i32),
            buf(at_values, n),
            half(narrowed, n),
            buf(rounded, n),
            Arg::I32(n as i32),
        ];
        k.run(&mut arena, &args).unwrap();
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for (b, &got) in floats(&arena[widened..widened + n_bits]).iter().enumerate() {
            assert!(same(got, from_bits(b as u16).get()), "{kernel}: {b:#06x} widens to {got:e}");
        }
        let stored: &[T] = &bytemuck::cast_slice(&arena[narrowed..rounded])[..n];
        for ((&v, &got), &round) in values.iter().zip(stored).zip(&floats(&arena[rounded..rounded + n])) {
            let want = T::put(v);
            assert!(got == want || (got.get().is_nan() && want.get().is_nan()), "{kernel}: {v:e} stores {got:?}");
            assert!(same(round, want.get()), "{kernel}: {v:e} rounds to {round:e}");
        }
    }
    check("hosttest_storage_bf16", DType::BF16, half::bf16::from_bits);
    check("hosttest_storage_f16", DType::F16, half::f16::from_bits);
}
