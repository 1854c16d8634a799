//! PyTorch golden data: the same weights and batch must give the reference logits, loss,
//! gradients, running statistics, weights after one SGD step and evaluation logits, in every
//! memory mode (tests/common/golden.rs states the tolerances).

mod common;

use common::golden::check;
use densenet::model::plan::Mode;

#[test]
fn bottleneck_matches_pytorch_in_every_mode() {
    for mode in Mode::ALL {
        check("bc", mode);
    }
}

#[test]
fn basic_matches_pytorch_in_every_mode() {
    for mode in Mode::ALL {
        check("basic", mode);
    }
}
