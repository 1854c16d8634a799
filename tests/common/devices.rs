//! The backends a test body runs on: the CPU backend, the CUDA backend on the host device
//! always, and on a GPU when one is present (otherwise the GPU variant says loudly that it was
//! skipped, or fails under `DENSENET_REQUIRE_GPU=1`, as `scripts/gpu-check.sh run` sets it on a
//! GPU machine). `on_backends!` runs one body on all three, `on_devices!` on the CUDA two.

use densenet::backend::cuda::{CudaBackend, GpuExec, HostExec};

/// Runs `test` on the host device.
pub fn on_host(test: impl FnOnce(&dyn Fn() -> CudaBackend<HostExec>)) {
    test(&|| CudaBackend::new(HostExec::new()));
}

/// Runs `test` on GPU 0, or prints why it was skipped (a failure under
/// `DENSENET_REQUIRE_GPU=1`).
pub fn on_gpu(name: &str, test: impl FnOnce(&dyn Fn() -> CudaBackend<GpuExec>)) {
    // The probe is dropped before the test opens its own executors.
    match GpuExec::new(0).map(drop) {
        Ok(()) => test(&|| CudaBackend::new(GpuExec::new(0).expect("GPU 0 opened once already"))),
        Err(e) if gpu_required() => panic!("{name} needs a GPU (DENSENET_REQUIRE_GPU=1): {e}"),
        Err(e) => eprintln!("SKIPPED {name} on the GPU: {e}"),
    }
}

/// Whether `DENSENET_REQUIRE_GPU=1`: a GPU test that cannot open GPU 0 fails instead of
/// skipping.
pub fn gpu_required() -> bool {
    std::env::var("DENSENET_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Declares `$name` three times, like candle's `test_device!`: `cpu` on the CPU backend,
/// `host` on the CUDA backend's host device and `gpu` on GPU 0 (skipped without one); `$body`
/// is a function generic over the backend, `fn body<B: Backend>(make: &dyn Fn() -> B)`, taking
/// a factory of fresh backends.
#[macro_export]
macro_rules! on_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn cpu() {
                super::$body(&densenet::backend::CpuBackend::new);
            }
            $crate::cuda_variants!($name, $body);
        }
    };
}

/// The `host` and `gpu` tests of `$body` in the module `$name` being declared.
#[macro_export]
macro_rules! cuda_variants {
    ($name:ident, $body:ident) => {
        #[test]
        fn host() {
            super::common::devices::on_host(|make| super::$body(make));
        }
        #[test]
        fn gpu() {
            super::common::devices::on_gpu(stringify!($name), |make| super::$body(make));
        }
    };
}

/// Declares `$name` twice: `host` on the host device and `gpu` on GPU 0 (skipped without one);
/// `$body` is a function generic over the executor taking a backend factory.
#[macro_export]
macro_rules! on_devices {
    ($name:ident, $body:ident) => {
        mod $name {
            $crate::cuda_variants!($name, $body);
        }
    };
}
