//! The portable path (no AVX2: the `gemm` crate, BN-ReLU applied to a copy of the input instead
//! of inside the kernels) against the PyTorch golden data (16-bit steps too), and its ops on
//! 16-bit tensors (`common::precision`). `DENSENET_NO_SIMD` must be set before the backend first asks, so
//! this binary holds this one test.

mod common;

use densenet::config::Precision;
use densenet::model::plan::Mode;

#[test]
fn portable_kernels_match_pytorch() {
    std::env::set_var("DENSENET_NO_SIMD", "1");
    for mode in Mode::ALL {
        common::golden::check(&densenet::backend::CpuBackend::new, "bc", mode);
        common::golden::check(&densenet::backend::CpuBackend::new, "basic", mode);
    }
    common::precision::writes_round_and_reads_widen();
    common::precision::elementwise_and_pooling_ops_round_the_f32_result();
    common::precision::batch_norm_ops_round_the_f32_result();
    common::precision::max_pool_rounds_its_fused_bn_relu_as_stored();
    common::precision::convolutions_round_the_f32_result();
    for precision in [Precision::Bf16, Precision::Fp16] {
        common::golden::check_rounded(&densenet::backend::CpuBackend::new, "bc", Mode::Minimal, precision);
    }
}
