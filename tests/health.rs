//! Values that are not finite stop training: SGD and the running-statistics update raise a
//! flag that is read with every step's loss, and the step fails naming the tensor, on the CPU
//! backend and on the CUDA backend (host device, and GPU 0 when there is one).

#[macro_use]
mod common;

use densenet::backend::cuda::{CudaBackend, Exec};
use densenet::backend::{Backend, CpuBackend, Sgd};
use densenet::config::NetConfig;
use densenet::model::plan::Mode;
use densenet::model::Model;

/// A step with a learning rate so large that SGD overflows fails, naming a parameter, and so
/// does every later step and evaluation (the flag is never cleared); a sane step before it
/// passes.
fn an_overflowing_step_is_an_error_naming_the_tensor<B: Backend>(be: B) {
    let cfg = NetConfig::cifar(10, 4, true, 0.5, 0.0, 10).unwrap();
    let (n, h) = (4, 8);
    let (images, labels) = common::batch(3, n, h, h, cfg.num_classes);
    let mut m = Model::new(cfg, n, h, h, Mode::Minimal, 1, be).unwrap();
    m.train_step(&images, &labels, Sgd::default()).unwrap();
    let huge = Sgd { lr: f32::MAX, ..Sgd::default() };
    let e = m.train_step(&images, &labels, huge).expect_err("an overflowing step passed").to_string();
    assert!(e.starts_with("training stopped at step 2: parameter "), "{e}");
    assert!(e.contains(" holds ") && e.contains(" at element "), "{e}");
    let again = m.evaluate(&images, &labels).expect_err("evaluation after the overflow passed").to_string();
    assert!(again.starts_with("training stopped at step 2"), "{again}");
}

#[test]
fn cpu() {
    an_overflowing_step_is_an_error_naming_the_tensor(CpuBackend::new());
}

fn cuda<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    an_overflowing_step_is_an_error_naming_the_tensor(make());
}
on_devices!(cuda_backend, cuda);
