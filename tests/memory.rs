//! Measured memory equals the plan: a counting global allocator records the heap while the
//! model is built and while it trains. Building allocates the planned arena (plus the small
//! network description); a training step allocates nothing beyond a stated allowance.

mod common;

use densenet::backend::Sgd;
use densenet::config::NetConfig;
use densenet::measure::{Counting, Heap};
use densenet::model::plan::Mode;

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap growth above the start at the peak of `f`, and the allocations `f` made.
fn peak_growth(f: impl FnOnce()) -> (usize, usize) {
    let heap = Heap::start();
    f();
    let grown = heap.since();
    (grown.peak, grown.calls)
}

/// Network description, names and plan bookkeeping allocated beside the arena, plus one
/// tensor's initial values staged on the host while building.
fn build_allowance(largest_tensor_bytes: usize) -> usize {
    (1 << 20) + largest_tensor_bytes
}

/// Allocation calls a step may make (rayon's occasional job-queue growth); the engine itself
/// makes none.
const STEP_CALLS: usize = 16;

/// Transient allocations inside a step: rayon's job lists (a few KB); without AVX2+FMA the
/// `gemm` crate's packing buffers as well.
fn step_allowance() -> usize {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        return 64 << 10;
    }
    4 << 20
}

#[test]
fn measured_heap_equals_the_plan() {
    // One test in this binary: the counters are process-wide.
    let cfg = NetConfig::cifar(40, 12, true, 0.5, 0.2, 10).unwrap();
    let (n, hw) = (16, 32);
    let (images, labels) = common::batch(3, n, hw, hw, 10);
    for mode in Mode::ALL {
        let mut model = None;
        let (build, _) = peak_growth(|| model = Some(common::model(&cfg, n, hw, hw, mode, 1)));
        let mut m = model.unwrap();
        let planned = m.plan().total_bytes();
        assert!(build >= planned, "{mode}: built {build} B, plan {planned} B");
        let largest = m.layout().params.iter().map(|t| t.len() * 4).max().unwrap();
        let allowance = build_allowance(largest);
        assert!(build <= planned + allowance, "{mode}: built {build} B, plan {planned} B");
        for step in 0..2 {
            let (g, calls) = peak_growth(|| {
                m.train_step(&images, &labels, Sgd::default()).unwrap();
            });
            println!("{mode}: plan {planned} B, build {build} B, step {step}: heap +{g} B in {calls} allocations");
            assert!(g <= step_allowance(), "{mode}: step {step} allocated {g} B beyond the plan");
            assert!(calls <= STEP_CALLS, "{mode}: step {step} made {calls} allocations");
        }
    }
}
