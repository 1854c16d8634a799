//! The CPU backend's ops on 16-bit tensors against the same ops in f32 (the checks and what
//! they hold: `common::precision`), on the AVX2 kernels; `tests/fallback.rs` runs them on the
//! portable path.

mod common;

#[test]
fn writes_round_and_reads_widen() {
    common::precision::writes_round_and_reads_widen();
}

#[test]
fn elementwise_and_pooling_ops_round_the_f32_result() {
    common::precision::elementwise_and_pooling_ops_round_the_f32_result();
}

#[test]
fn batch_norm_ops_round_the_f32_result() {
    common::precision::batch_norm_ops_round_the_f32_result();
}

#[test]
fn max_pool_rounds_its_fused_bn_relu_as_stored() {
    common::precision::max_pool_rounds_its_fused_bn_relu_as_stored();
}
