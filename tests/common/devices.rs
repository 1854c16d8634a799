//! The executors the CUDA backend is tested on: the host device always, a GPU when one is
//! present (otherwise the GPU variant says loudly that it was skipped).

use densenet::backend::cuda::{CudaBackend, GpuExec, HostExec};

/// Runs `test` on the host device.
pub fn on_host(test: impl FnOnce(&dyn Fn() -> CudaBackend<HostExec>)) {
    test(&|| CudaBackend::new(HostExec::new()));
}

/// Runs `test` on GPU 0, or prints why it was skipped.
pub fn on_gpu(name: &str, test: impl FnOnce(&dyn Fn() -> CudaBackend<GpuExec>)) {
    // The probe is dropped before the test opens its own executors.
    match GpuExec::new(0).map(drop) {
        Ok(()) => test(&|| CudaBackend::new(GpuExec::new(0).expect("GPU 0 opened once already"))),
        Err(e) => eprintln!("SKIPPED {name} on the GPU: {e}"),
    }
}

/// Declares `$name` twice: `host` on the host device and `gpu` on GPU 0 (skipped without one);
/// `$body` is a function generic over the executor taking a backend factory.
#[macro_export]
macro_rules! on_devices {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn host() {
                super::common::devices::on_host(|make| super::$body(make));
            }
            #[test]
            fn gpu() {
                super::common::devices::on_gpu(stringify!($name), |make| super::$body(make));
            }
        }
    };
}
