//! One full training step (forward, loss, backward, SGD) of DenseNet-BC-100-12 on 32x32 random
//! data, per memory mode, preceded by the planner's memory table for BC-100-12, BC-250-24 and
//! BC-190-40. `DENSENET_BENCH_BATCH` overrides the batch (default 64).

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use densenet::backend::{Backend, CpuBackend, Sgd};
use densenet::config::NetConfig;
use densenet::measure::mib;
use densenet::model::net::Net;
use densenet::model::plan::{Category, Mode, Plan};
use densenet::model::Model;
use densenet::rng;
use std::time::Duration;

/// Input height and width.
const SIZE: usize = 32;

/// CIFAR-10 classes.
const CLASSES: usize = 10;

/// The batch: `DENSENET_BENCH_BATCH` or 64.
fn batch() -> usize {
    std::env::var("DENSENET_BENCH_BATCH").map_or(64, |v| v.parse().expect("DENSENET_BENCH_BATCH: a positive integer"))
}

/// DenseNet-BC-`depth`-`growth` for CIFAR-10.
fn bc(depth: usize, growth: usize) -> NetConfig {
    NetConfig::cifar(depth, growth, true, 0.5, 0.0, CLASSES).expect("valid DenseNet-BC")
}

/// Prints the planned bytes per category (MiB) of each network and mode, without allocating.
fn print_memory_table(batch: usize) {
    let mut be = CpuBackend::new();
    print!("{:<22} {:<8}", format!("planned MiB, batch {batch}"), "mode");
    for c in Category::ALL {
        print!(" {:>11}", c.name());
    }
    println!(" {:>11}", "total");
    for cfg in [bc(100, 12), bc(250, 24), bc(190, 40)] {
        let net = Net::new(&cfg);
        for mode in Mode::ALL {
            let plan =
                Plan::new(&cfg, &net, batch, SIZE, SIZE, mode, |convs| be.workspace_len(convs, 3 * SIZE * SIZE, batch))
                    .expect("plan DenseNet-BC");
            print!("{:<22} {:<8}", cfg.name(), mode.to_string());
            for c in Category::ALL {
                print!(" {:>11.1}", mib(plan.bytes(c)));
            }
            println!(" {:>11.1}", mib(plan.total_bytes()));
        }
    }
    println!();
}

/// Benchmarks one training step of BC-100-12 in each memory mode.
fn train_step(c: &mut Criterion) {
    let batch = batch();
    print_memory_table(batch);
    let (images, labels) = rng::random_batch(1, batch, SIZE, SIZE, CLASSES).expect("a batch fits in memory");
    let mut group = c.benchmark_group(format!("train_step/DenseNet-BC-100-12/batch{batch}"));
    group
        .throughput(Throughput::Elements(batch as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(3))
        .measurement_time(Duration::from_secs(30));
    for mode in Mode::ALL {
        let mut model = Model::new(bc(100, 12), batch, SIZE, SIZE, mode, 0, CpuBackend::new()).expect("build model");
        group.bench_function(mode.to_string(), |b| {
            b.iter(|| model.train_step(&images, &labels, Sgd::default()).expect("train step"))
        });
    }
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
