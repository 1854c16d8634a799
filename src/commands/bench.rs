//! `densenet bench`: training steps on random data, planned and measured memory.

use super::args::NetArgs;
use super::device::{self, DeviceArgs};
use super::memory::plan_line;
use super::output::{report, report_json};
use super::{parse, usage, Outcome};
use clap::Args;
use densenet::backend::{Backend, Library, Sgd};
use densenet::config::{NetConfig, Precision};
use densenet::measure::{self, mib, Heap};
use densenet::model::plan::Mode;
use densenet::model::Model;
use densenet::rng;
use serde::Serialize;
use std::time::Instant;

/// Seed of `bench`'s network and random batch.
const SEED: u64 = 0;

/// The flags of `densenet bench`.
#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Timed training steps (the step time reported is their median).
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = parse::steps, allow_negative_numbers = true)]
    steps: usize,
    /// Untimed steps first (thread start-up, first touch of the arena, caches).
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = parse::warmup, allow_negative_numbers = true)]
    warmup: usize,
    #[command(flatten)]
    device: DeviceArgs,
    /// Memory mode: naive, shared or minimal.
    #[arg(long, value_name = "MODE", default_value = "minimal")]
    memory: Mode,
    /// Storage precision of the large tensors: f32, bf16 or fp16 (docs/precision.md; the CPU
    /// backend only so far).
    #[arg(long, value_name = "P", default_value = "f32")]
    precision: Precision,
    /// Also print the result as one JSON object, the last line.
    #[arg(long)]
    json: bool,
}

/// `bench --json`: speed, planned and measured memory, and what ran the steps.
#[derive(Serialize)]
pub(crate) struct BenchReport {
    /// The network's conventional name.
    network: String,
    /// What ran the steps (the `Device:` line's description).
    device: String,
    /// The memory mode.
    memory: String,
    batch: usize,
    /// The input's height and width.
    image_size: usize,
    /// Timed steps.
    steps: usize,
    /// Untimed steps before them.
    warmup: usize,
    /// Images per second at the median step time.
    images_per_s: f64,
    /// The median step time, milliseconds.
    step_ms: f64,
    /// The plan's total bytes.
    planned_peak_bytes: usize,
    /// The peak heap, counted from just before the model was built to the last step.
    measured_peak_bytes: usize,
    /// The process's peak resident set size (0 where unknown).
    peak_rss_bytes: usize,
    /// On a device: the bytes allocated (the plan's); `null` on the CPU.
    device_allocated_bytes: Option<usize>,
    /// On a device: the memory in use beyond what it was once the CUDA context was created.
    device_process_bytes: Option<usize>,
    /// How the timed steps ran on a GPU (`replayed`, `eager`, ...); `null` on the CPU.
    graphs: Option<String>,
    /// The wall clock (Unix seconds) when the timed steps started.
    timed_start_unix_s: f64,
    /// The wall clock when they ended.
    timed_end_unix_s: f64,
    /// The run-time libraries loaded.
    libraries: Vec<Library>,
    /// The cuDNN loaded; `null` on the CPU.
    cudnn: Option<Cudnn>,
}

/// The cuDNN of a [`BenchReport`].
#[derive(Serialize)]
pub(crate) struct Cudnn {
    version: String,
    cuda: Option<String>,
    path: Option<String>,
}

/// Runs `densenet bench`.
pub(crate) fn run(a: BenchArgs) -> Outcome {
    let cfg = NetConfig { precision: a.precision, ..a.net.config(a.net.free_classes()).map_err(usage)? };
    let size = a.net.image_size();
    cfg.geometry(size, size).map_err(usage)?;
    let (be, why) = a.device.open()?;
    bench(a, cfg, size, be, &why)
}

fn bench(a: BenchArgs, cfg: NetConfig, size: usize, be: impl Backend, why: &str) -> Outcome {
    let (batch, classes) = (a.net.batch, cfg.num_classes);
    let Some((images, labels)) = rng::random_batch(SEED, batch, size, size, classes) else {
        return Err(super::failure(format!("a random batch of {batch} images does not fit in memory")));
    };
    let heap = Heap::start();
    let mut model = Model::new(cfg, batch, size, size, a.memory, SEED, be)?;
    report(format_args!(
        "{}: training steps on random {size}x{size} images of {classes} classes (seed {SEED}), batch {batch}, {} \
         parameters",
        model.config().name(),
        model.layout().len
    ))?;
    report(device::line(model.backend(), why))?;
    report(plan_line(model.plan()))?;
    let mut times = Vec::new();
    let mut window = (0.0, 0.0);
    for s in 0..a.warmup + a.steps {
        if s == a.warmup {
            window.0 = unix_seconds();
        }
        let start = Instant::now();
        model.train_step(&images, &labels, Sgd::default())?;
        let secs = start.elapsed().as_secs_f64();
        if s < a.warmup {
            report(format_args!("Warm-up step {}/{}: {:.1} ms", s + 1, a.warmup, 1e3 * secs))?;
        } else {
            times.push(secs);
            let (i, n) = (times.len(), a.steps);
            report(format_args!("Step {i}/{n}: {:.1} ms ({:.1} images/s)", 1e3 * secs, batch as f64 / secs))?;
        }
    }
    window.1 = unix_seconds();
    let measured = heap.since().peak;
    let planned = model.plan().total_bytes();
    let rss = measure::peak_rss();
    times.sort_by(f64::total_cmp);
    let median = match times.len() % 2 {
        1 => times[times.len() / 2],
        _ => (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0,
    };
    let images_per_s = batch as f64 / median;
    report(format_args!(
        "Median step {:.1} ms (min {:.1}, max {:.1}): {images_per_s:.1} images/s",
        1e3 * median,
        1e3 * times[0],
        1e3 * times[times.len() - 1]
    ))?;
    let on_device = model.backend().device_memory();
    let rss_text = rss.map_or("unknown".to_string(), |r| format!("{:.1} MiB", mib(r)));
    match on_device {
        // The arena is on the device: the host heap holds little of the plan.
        Some(d) => report(format_args!(
            "Device memory {:.1} MiB allocated, {:.1} MiB planned; {} in use on the device beyond what it was \
             once the CUDA context was created (kernels, cuDNN, arena, graphs); peak RSS {rss_text}",
            mib(d.allocated),
            mib(planned),
            d.process.map_or("an unknown amount".to_string(), |p| format!("{:.1} MiB", mib(p)))
        ))?,
        None => report(format_args!(
            "Peak heap {:.1} MiB measured, {:.1} MiB planned (+{:.1} MiB); peak RSS {rss_text}",
            mib(measured),
            mib(planned),
            mib(measured.saturating_sub(planned))
        ))?,
    }
    let graphs = model.backend().graphs();
    if let Some(g) = &graphs {
        report(format_args!("Training steps: {g} (CUDA graphs)"))?;
    }
    if a.json {
        let libraries = model.backend().libraries();
        let cudnn = libraries.iter().find(|l| l.name == "cudnn");
        let cudnn = cudnn.map(|l| Cudnn { version: l.version.clone(), cuda: l.cuda.clone(), path: l.path.clone() });
        report_json(&BenchReport {
            network: model.config().name(),
            device: model.backend().describe(),
            memory: a.memory.to_string(),
            batch,
            image_size: size,
            steps: a.steps,
            warmup: a.warmup,
            images_per_s,
            step_ms: 1e3 * median,
            planned_peak_bytes: planned,
            measured_peak_bytes: measured,
            peak_rss_bytes: rss.unwrap_or(0),
            device_allocated_bytes: on_device.map(|d| d.allocated),
            device_process_bytes: on_device.and_then(|d| d.process),
            graphs,
            timed_start_unix_s: window.0,
            timed_end_unix_s: window.1,
            libraries,
            cudnn,
        })?;
    }
    Ok(())
}

/// Seconds since the Unix epoch, by the wall clock (the timed window, for matching samples of
/// the device's memory taken by another process).
fn unix_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_has_the_readmes_schema() {
        let cpu = || BenchReport {
            network: "DenseNet-BC-100-12".into(),
            device: "cpu (2 threads)".into(),
            memory: "minimal".into(),
            batch: 64,
            image_size: 32,
            steps: 10,
            warmup: 2,
            images_per_s: 80.5,
            step_ms: 795.0,
            planned_peak_bytes: 1 << 28,
            measured_peak_bytes: 1 << 28,
            peak_rss_bytes: 1 << 29,
            device_allocated_bytes: None,
            device_process_bytes: None,
            graphs: None,
            timed_start_unix_s: 1.5e9,
            timed_end_unix_s: 1.6e9,
            libraries: Vec::new(),
            cudnn: None,
        };
        let cudnn = Library { name: "cudnn".into(), version: "9.13.0".into(), cuda: Some("13.0".into()), path: None };
        let gpu = BenchReport {
            device_allocated_bytes: Some(1 << 28),
            device_process_bytes: Some(1 << 29),
            graphs: Some("replayed".into()),
            libraries: vec![cudnn.clone()],
            cudnn: Some(Cudnn { version: cudnn.version, cuda: cudnn.cuda, path: Some("libcudnn.so.9".into()) }),
            ..cpu()
        };
        for report in [&cpu(), &gpu] {
            crate::commands::output::schema::check("densenet bench --json", report);
        }
    }
}
