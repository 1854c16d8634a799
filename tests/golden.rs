//! PyTorch golden data: the same weights and batch must give the reference logits, loss,
//! gradients, running statistics, weights after one SGD step and evaluation logits, in every
//! memory mode (tests/common/golden.rs states the tolerances), on every backend: the CPU, the
//! CUDA backend on the host device and on a GPU.

#[macro_use]
mod common;

use common::golden::check;
use densenet::backend::Backend;
use densenet::model::plan::Mode;

fn bottleneck<B: Backend>(make: &dyn Fn() -> B) {
    for mode in Mode::ALL {
        check(make, "bc", mode);
    }
}
on_backends!(bottleneck_matches_pytorch_in_every_mode, bottleneck);

fn basic<B: Backend>(make: &dyn Fn() -> B) {
    for mode in Mode::ALL {
        check(make, "basic", mode);
    }
}
on_backends!(basic_matches_pytorch_in_every_mode, basic);

/// Layers of more input channels than 2k: BN1-ReLU's backward runs a chunk of channels at a
/// time, the last one partial, from copied columns of the weight (1x1 and 3x3).
fn chunked<B: Backend>(make: &dyn Fn() -> B) {
    for mode in Mode::ALL {
        check(make, "chunked", mode);
        check(make, "chunked_basic", mode);
    }
}
on_backends!(chunked_layers_match_pytorch_in_every_mode, chunked);
