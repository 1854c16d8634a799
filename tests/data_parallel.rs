//! Data-parallel training on the CPU and the host device, ranks as threads joined by a
//! rendezvous on this machine: with synchronized BN, N ranks of a global batch take the
//! single-rank step on the whole batch (relative 1e-5; a job of one rank too, its collectives
//! copies) in every memory mode, with and without dropout, with uneven shards; with local BN,
//! each rank takes the single-device step on its shard and the gradients are summed weighted by
//! shard (the average for equal shards). `tests/launch.rs` runs jobs of separate processes
//! through the command line.

mod common;

use common::norm_rel;
use densenet::backend::cuda::{CudaBackend, HostExec};
use densenet::backend::{Backend, CpuBackend, Sgd};
use densenet::comm::rendezvous::rendezvous;
use densenet::comm::{shard, BnMode, Group};
use densenet::config::NetConfig;
use densenet::model::plan::Mode;
use densenet::model::Model;
use std::time::Duration;

/// Images of the test networks (8 x 8: two transitions leave 2 x 2).
const SIDE: usize = 8;
/// Steps compared.
const STEPS: u64 = 5;

/// A port no one listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `body` on every rank of a job of `world` threads, each with a backend from `make`
/// joined to the job; the results in rank order.
fn job<B: Backend, T: Send>(world: usize, make: fn() -> B, body: impl Fn(B) -> T + Sync) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let ranks: Vec<_> = (0..world)
            .map(|rank| {
                let body = &body;
                s.spawn(move || {
                    let links = rendezvous(Group { rank, world }, "127.0.0.1", port, Duration::from_secs(60)).unwrap();
                    let mut be = make();
                    be.join(links).unwrap();
                    assert_eq!(be.group(), Some(Group { rank, world }));
                    body(be)
                })
            })
            .collect();
        ranks.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// What a run leaves: each step's loss and correct count, then the last step's gradients and
/// the parameters, momentum and running statistics.
#[derive(Debug)]
struct After {
    losses: Vec<f32>,
    correct: Vec<usize>,
    grads: Vec<f32>,
    params: Vec<f32>,
    momentum: Vec<f32>,
    running: Vec<f32>,
}

/// `STEPS` SGD steps on global batches of `batch` images (a new one each step).
fn train<B: Backend>(m: &mut Model<B>, batch: usize) -> After {
    let (mut losses, mut correct) = (Vec::new(), Vec::new());
    for step in 0..STEPS {
        let (images, labels) = common::batch(100 + step, batch, SIDE, SIDE, 10);
        let s = m.train_step(&images, &labels, Sgd::default()).unwrap();
        assert_eq!(s.n, batch, "a step's count is the global batch's");
        losses.push(s.loss);
        correct.push(s.correct);
    }
    After { losses, correct, grads: m.grads(), params: m.params(), momentum: m.momentum(), running: m.running_stats() }
}

fn net(drop: f32) -> NetConfig {
    NetConfig::cifar(16, 4, true, 0.5, drop, 10).unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let e = norm_rel(got, want);
    assert!(e <= 1e-5, "{what}: relative error {e:e}");
}

/// Synchronized BN: every rank of 2 and 3 ends where one rank on the whole batch does.
fn sync_bn_equals_one_rank_on_the_whole_batch<B: Backend>(make: fn() -> B) {
    // 7 images: shards of 4 + 3 and 3 + 2 + 2.
    let batch = 7;
    for drop in [0.0, 0.2] {
        for mode in Mode::ALL {
            let cfg = net(drop);
            let want = train(&mut Model::new(cfg.clone(), batch, SIDE, SIDE, mode, 3, make()).unwrap(), batch);
            for world in [1, 2, 3] {
                let ranks = job(world, make, |be| {
                    let mut m = Model::new(cfg.clone(), batch, SIDE, SIDE, mode, 3, be).unwrap();
                    assert_eq!(m.plan().batch, shard(batch, world, 0).len(), "a rank plans for its shard");
                    train(&mut m, batch)
                });
                for (rank, got) in ranks.iter().enumerate() {
                    let at = format!("drop {drop} {mode} rank {rank} of {world}");
                    assert_close(&format!("{at}: losses"), &got.losses, &want.losses);
                    assert_eq!(got.correct, want.correct, "{at}: correct counts");
                    assert_close(&format!("{at}: gradients"), &got.grads, &want.grads);
                    assert_close(&format!("{at}: parameters"), &got.params, &want.params);
                    assert_close(&format!("{at}: momentum"), &got.momentum, &want.momentum);
                    assert_close(&format!("{at}: running statistics"), &got.running, &want.running);
                }
            }
        }
    }
}

/// Local BN: a rank's gradient is the sum over the ranks of each one's single-device gradient
/// on its shard weighted by its share of the batch, and its running statistics are its own
/// shard's until rank 0's are shared.
fn local_bn_equals_independent_steps_on_the_shards<B: Backend>(make: fn() -> B) {
    let cfg = net(0.0);
    for (batch, world) in [(6, 2), (6, 3), (7, 3)] {
        let (images, labels) = common::batch(9, batch, SIDE, SIDE, 10);
        let per = images.len() / batch;
        let solo: Vec<_> = (0..world)
            .map(|r| {
                let s = shard(batch, world, r);
                let mut m = Model::new(cfg.clone(), s.len(), SIDE, SIDE, Mode::Minimal, 3, make()).unwrap();
                m.forward_backward(&images[s.start * per..s.end * per], &labels[s.clone()]).unwrap();
                (s.len() as f32 / batch as f32, m.grads(), m.running_stats())
            })
            .collect();
        let mut want = vec![0.0; solo[0].1.len()];
        for (share, grads, _) in &solo {
            want.iter_mut().zip(grads).for_each(|(w, g)| *w += share * g);
        }
        let ranks = job(world, make, |be| {
            let mut m = Model::new(cfg.clone(), batch, SIDE, SIDE, Mode::Minimal, 3, be).unwrap();
            m.set_bn_mode(BnMode::Local);
            m.forward_backward(&images, &labels).unwrap();
            let own = m.running_stats();
            m.share_running_stats().unwrap();
            (m.grads(), own, m.running_stats())
        });
        for (rank, (grads, own, shared)) in ranks.iter().enumerate() {
            let at = format!("{batch} images, rank {rank} of {world}");
            assert_close(&format!("{at}: gradients"), grads, &want);
            assert_close(&format!("{at}: running statistics"), own, &solo[rank].2);
            assert_eq!(shared, &ranks[0].1, "{at}: rank 0's running statistics are shared");
        }
    }
}

/// A global batch smaller than the job cannot train (a rank would have no image), and says so
/// on every rank; evaluating it works, the empty ranks adding nothing.
fn a_batch_smaller_than_the_job<B: Backend>(make: fn() -> B) {
    let cfg = net(0.0);
    let (images, labels) = common::batch(4, 2, SIDE, SIDE, 10);
    let want =
        Model::new(cfg.clone(), 2, SIDE, SIDE, Mode::Minimal, 3, make()).unwrap().evaluate(&images, &labels).unwrap();
    for r in job(3, make, |be| {
        let mut m = Model::new(cfg.clone(), 3, SIDE, SIDE, Mode::Minimal, 3, be).unwrap();
        let e = m.train_step(&images, &labels, Sgd::default()).unwrap_err();
        (e, m.evaluate(&images, &labels).unwrap())
    }) {
        assert_eq!(r.0 .0, "a batch of 2 images leaves rank 2 of 3 without one (each rank needs one)");
        assert_eq!((r.1.correct, r.1.n), (want.correct, 2));
        assert!((r.1.loss - want.loss).abs() <= 1e-5 * want.loss, "{} vs {}", r.1.loss, want.loss);
    }
}

fn host() -> CudaBackend<HostExec> {
    CudaBackend::new(HostExec::new())
}

#[test]
fn sync_bn_on_the_cpu() {
    sync_bn_equals_one_rank_on_the_whole_batch(CpuBackend::new);
}

#[test]
fn sync_bn_on_the_host_device() {
    sync_bn_equals_one_rank_on_the_whole_batch(host);
}

#[test]
fn local_bn_on_the_cpu() {
    local_bn_equals_independent_steps_on_the_shards(CpuBackend::new);
}

#[test]
fn local_bn_on_the_host_device() {
    local_bn_equals_independent_steps_on_the_shards(host);
}

#[test]
fn small_batches_on_the_cpu() {
    a_batch_smaller_than_the_job(CpuBackend::new);
}

#[test]
fn small_batches_on_the_host_device() {
    a_batch_smaller_than_the_job(host);
}

/// With one GPU, the NCCL path at world size 1 (a job of one rank: every collective issued,
/// through NCCL) equals the plain single-GPU step (`scripts/gpu-check.sh` runs it; skipped
/// without a GPU).
#[test]
fn nccl_at_world_size_one_gpu() {
    common::devices::on_gpu("nccl_at_world_size_one", |make| {
        let batch = 7;
        for drop in [0.0, 0.2] {
            let cfg = net(drop);
            let want = train(&mut Model::new(cfg.clone(), batch, SIDE, SIDE, Mode::Minimal, 3, make()).unwrap(), batch);
            let mut be = make();
            let links = rendezvous(Group::SOLO, "127.0.0.1", free_port(), Duration::from_secs(60)).unwrap();
            be.join(links).unwrap();
            assert_eq!(be.group(), Some(Group::SOLO));
            assert!(be.libraries().iter().any(|l| l.name == "nccl"), "NCCL is reported");
            let got = train(&mut Model::new(cfg, batch, SIDE, SIDE, Mode::Minimal, 3, be).unwrap(), batch);
            let at = format!("drop {drop}, NCCL at world size 1");
            assert_close(&format!("{at}: losses"), &got.losses, &want.losses);
            assert_close(&format!("{at}: parameters"), &got.params, &want.params);
            assert_close(&format!("{at}: momentum"), &got.momentum, &want.momentum);
            assert_close(&format!("{at}: running statistics"), &got.running, &want.running);
        }
    });
}
