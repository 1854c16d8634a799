//! Stored images smaller than the model by a whole factor: the input op upsamples them after
//! their crop windows, and the model computes what it computes on the upsampled floats. On
//! every backend: the CPU, the CUDA backend on the host device and on a GPU.

#[macro_use]
mod common;

use densenet::backend::{Backend, Sgd};
use densenet::config::NetConfig;
use densenet::data::augment::normalization;
use densenet::data::cifar::Dataset;
use densenet::input::{Crop, Input};
use densenet::model::plan::Mode;
use densenet::rng;

fn upsampled<B: Backend>(make: &dyn Fn() -> B) {
    // Stored 32 x 48, the model planned at 64 x 96.
    let (n, h, w, s) = (2, 32, 48, 2);
    let cfg = NetConfig::cifar(16, 4, true, 0.5, 0.0, 10).unwrap();
    let bytes: Vec<u8> = (0..n * 3 * h * w).map(|i| rng::mix64(i as u64) as u8).collect();
    let crops = [Crop { top: 1, left: 6, flip: true }, Crop::NONE];
    let norm = normalization(Dataset::Cifar10);
    let labels = [3, 7];
    let stored = Input::Stored { bytes: &bytes, h, w, crops: &crops, norm: &norm };

    // The same images cut at the stored size, then each pixel repeated as an s x s square here.
    let mut floats = Vec::with_capacity(n * 3 * s * h * s * w);
    for (img, crop) in bytes.chunks_exact(3 * h * w).zip(&crops) {
        let mut cut = vec![0.0; 3 * h * w];
        crop.apply(img, &norm, h, w, 1, &mut cut);
        for row in cut.chunks_exact(w) {
            let wide: Vec<f32> = row.iter().flat_map(|&v| std::iter::repeat_n(v, s)).collect();
            for _ in 0..s {
                floats.extend_from_slice(&wide);
            }
        }
    }

    let mut a = common::model_on(make, &cfg, n, s * h, s * w, Mode::Minimal, 5);
    let mut b = common::model_on(make, &cfg, n, s * h, s * w, Mode::Minimal, 5);
    let (ea, eb) = (a.evaluate_on(stored, &labels).unwrap(), b.evaluate(&floats, &labels).unwrap());
    assert_eq!((ea, a.logits(n)), (eb, b.logits(n)), "evaluation");
    let ta = a.train_step_on(stored, &labels, Sgd::default()).unwrap();
    let tb = b.train_step(&floats, &labels, Sgd::default()).unwrap();
    assert_eq!(ta.correct, tb.correct);
    assert!((ta.loss - tb.loss).abs() <= 1e-6 * tb.loss, "loss {} vs {}", ta.loss, tb.loss);
    let e = common::max_rel(&a.params(), &b.params(), 1e-3);
    assert!(e < 1e-5, "parameters after a step differ by {e}");

    // Stored sizes the model's is not a whole multiple of (the same in both dimensions).
    for (h, w) in [(32, 40), (24, 36), (128, 192), (0, 0)] {
        let bytes = vec![0; n * 3 * h * w];
        let stored = Input::Stored { bytes: &bytes, h, w, crops: &crops, norm: &norm };
        let e = a.evaluate_on(stored, &labels).unwrap_err().to_string();
        let expect = format!("stored images of {h} x {w} do not upsample by a whole factor to the model's 64 x 96");
        assert_eq!(e, expect);
    }
    // A whole factor, but bytes for another size.
    let stored = Input::Stored { bytes: &bytes, h: 16, w: 24, crops: &crops, norm: &norm };
    let e = a.evaluate_on(stored, &labels).unwrap_err().to_string();
    assert_eq!(e, "9216 bytes of images for 2 labels; expected 2304 (2 x 3 x 16 x 24)");
}
on_backends!(stored_images_upsample_to_the_model, upsampled);
