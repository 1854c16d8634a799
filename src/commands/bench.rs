//! `densenet bench`: training steps on random data, planned and measured memory.

use super::device;
use super::memory::{mib, plan_line};
use crate::*;

pub(crate) fn bench(a: BenchArgs) -> Result<(), Failure> {
    let cfg = a.net.config().map_err(usage)?;
    let (be, why) = a.device.open()?;
    run(a, cfg, be, &why)
}

fn run<B: Backend>(a: BenchArgs, cfg: NetConfig, be: B, why: &str) -> Result<(), Failure> {
    let (batch, classes) = (a.net.batch, cfg.num_classes);
    // Normalized-image statistics, and labels of every class.
    let len = batch * 3 * SIDE * SIDE;
    let mut images = Vec::new();
    if images.try_reserve_exact(len).is_err() {
        return Err(failure(format!("a random batch of {batch} images does not fit in memory")));
    }
    images.extend((0..len).map(|i| rng::normal(BENCH_SEED, i as u64) as f32));
    let labels: Vec<u32> = (0..batch).map(|i| (rng::derive(BENCH_SEED, i as u64) % classes as u64) as u32).collect();
    let heap_start = heap::start();
    let mut model = Model::new(cfg, batch, SIDE, SIDE, a.memory, BENCH_SEED, be)?;
    report(format_args!(
        "{}: training steps on random {}-shaped data (seed {BENCH_SEED}), batch {batch}, {} parameters",
        model.config().name(),
        a.net.dataset.title(),
        model.layout().len
    ))?;
    report(format_args!("{}", device::line(model.backend(), why)))?;
    report(format_args!("{}", plan_line(model.plan())))?;
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
    let measured = heap::peak().saturating_sub(heap_start);
    let planned = model.plan().total_bytes();
    let rss = peak_rss();
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
    let device = model.backend().device_memory();
    let rss_text = if rss == 0 { "unknown".to_string() } else { format!("{:.1} MiB", mib(rss as usize)) };
    match device {
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
    let libraries: Vec<serde_json::Value> = model
        .backend()
        .libraries()
        .into_iter()
        .map(|l| serde_json::json!({ "name": l.name, "version": l.version, "cuda": l.cuda, "path": l.path }))
        .collect();
    if a.json {
        let cudnn = libraries
            .iter()
            .find(|l| l["name"] == "cudnn")
            .map(|l| serde_json::json!({ "version": l["version"], "cuda": l["cuda"], "path": l["path"] }));
        let json = serde_json::json!({
            "network": model.config().name(),
            "device": model.backend().describe(),
            "memory": a.memory.to_string(),
            "batch": batch,
            "steps": a.steps,
            "warmup": a.warmup,
            "images_per_s": images_per_s,
            "step_ms": 1e3 * median,
            "planned_peak_bytes": planned,
            "measured_peak_bytes": measured,
            "peak_rss_bytes": rss,
            "device_allocated_bytes": device.map(|d| d.allocated),
            "device_process_bytes": device.and_then(|d| d.process),
            "graphs": graphs,
            "timed_start_unix_s": window.0,
            "timed_end_unix_s": window.1,
            "libraries": libraries,
            "cudnn": cudnn,
        });
        report(format_args!("{json}"))?;
    }
    Ok(())
}

/// Seconds since the Unix epoch, by the wall clock (the timed window, for matching samples of
/// the device's memory taken by another process).
fn unix_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// This process's peak resident set size in bytes (`VmHWM` in /proc/self/status); 0 where
/// that is not available.
pub(crate) fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().strip_suffix("kB"));
    kib.and_then(|v| v.trim().parse::<u64>().ok()).map_or(0, |k| k * 1024)
}

/// Heap accounting for `bench`: the system allocator, counting the bytes in use and their peak
/// (two relaxed atomic operations per allocation; a training step allocates next to nothing).
pub(crate) mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    static CURRENT: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);

    /// The counting allocator.
    pub struct Counting;

    fn grow(bytes: usize) {
        let now = CURRENT.fetch_add(bytes, Relaxed) + bytes;
        PEAK.fetch_max(now, Relaxed);
    }

    fn shrink(bytes: usize) {
        CURRENT.fetch_sub(bytes, Relaxed);
    }

    // SAFETY: every call goes to the system allocator unchanged; only successful ones are counted.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = System.alloc(layout);
            if !p.is_null() {
                grow(layout.size());
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = System.alloc_zeroed(layout);
            if !p.is_null() {
                grow(layout.size());
            }
            p
        }

        unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
            System.dealloc(p, layout);
            shrink(layout.size());
        }

        unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
            let q = System.realloc(p, layout, size);
            if !q.is_null() {
                if size > layout.size() {
                    grow(size - layout.size());
                } else {
                    shrink(layout.size() - size);
                }
            }
            q
        }
    }

    /// Starts a measurement: the peak restarts from the bytes in use now, which are returned.
    pub fn start() -> usize {
        let now = CURRENT.load(Relaxed);
        PEAK.store(now, Relaxed);
        now
    }

    /// The most bytes in use at once since [`start`].
    pub fn peak() -> usize {
        PEAK.load(Relaxed)
    }
}
