//! The plan audited by live ranges (`densenet::model::audit`): two rounds of a training step
//! and an evaluation of every CIFAR variant and ImageNet preset, in every memory mode, at
//! batch 1 and 64, recorded and replayed against the plan (whose regions share bytes by live
//! range): every view inside its region, no tensor overwritten while a later op still reads
//! it, nothing read that was never written.

use densenet::backend::Sgd;
use densenet::comm::Group;
use densenet::config::{NetConfig, Precision};
use densenet::model::audit::{audit, Recorder};
use densenet::model::plan::Mode;
use densenet::model::Model;

/// Audits one training step and one evaluation of `cfg` at batch `n` on `side` x `side`.
fn check(cfg: &NetConfig, n: usize, side: usize, mode: Mode) {
    check_on(Recorder::new(), cfg, n, side, mode);
}

/// [`check`] on `recorder` (alone, or a rank of a job).
fn check_on(recorder: Recorder, cfg: &NetConfig, n: usize, side: usize, mode: Mode) {
    let mut m = Model::new(cfg.clone(), n, side, side, mode, 1, recorder).unwrap();
    let images = vec![0.5; n * 3 * side * side];
    let labels: Vec<u32> = (0..n as u32).map(|i| i % cfg.num_classes as u32).collect();
    // Twice: what one step or pass leaves for the next (momentum, parameters, running
    // statistics, the SGD settings) must survive the regions that share bytes by live range.
    for _ in 0..2 {
        m.train_step(&images, &labels, Sgd::default()).unwrap();
        m.evaluate(&images, &labels).unwrap();
    }
    let ops = m.backend().ops();
    let what = format!("{} {mode} batch {n}", cfg.name());
    let report = audit(m.plan(), &ops).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(ops.len() > 10 && report.live.len() > 5, "{what}: {} ops, {} tensors", ops.len(), report.live.len());
}

#[test]
fn cifar_variants_pass_the_audit() {
    let variants =
        [(40, 12, false, 1.0), (100, 12, true, 0.5), (250, 24, true, 0.5), (190, 40, true, 0.5), (100, 24, false, 1.0)];
    for (depth, growth, bottleneck, reduction) in variants {
        let cfg = NetConfig::cifar(depth, growth, bottleneck, reduction, 0.2, 10).unwrap();
        for mode in Mode::ALL {
            for n in [1, 64] {
                check(&cfg, n, 32, mode);
            }
        }
    }
}

#[test]
fn imagenet_presets_pass_the_audit() {
    for preset in ["densenet121", "densenet169", "densenet201", "densenet161", "densenet264"] {
        let cfg = NetConfig::imagenet(preset).unwrap();
        for mode in Mode::ALL {
            for n in [1, 64] {
                check(&cfg, n, 224, mode);
            }
        }
    }
    // With dropout, the transitions convolve first, a chunk of images at a time.
    let cfg = NetConfig { drop_rate: 0.2, ..NetConfig::imagenet("densenet121").unwrap() };
    for mode in Mode::ALL {
        for n in [1, 2, 3, 64] {
            check(&cfg, n, 224, mode);
        }
    }
}

/// A rank of a data-parallel job with synchronized BN (its collectives' scratch at the arena's
/// end, the statistics gathered into it, the BN backward sums reduced through it; each
/// collective's spans checked), every mode, uneven shards.
#[test]
fn ranks_of_a_job_pass_the_audit() {
    let cifar = NetConfig::cifar(100, 12, true, 0.5, 0.2, 10).unwrap();
    for (cfg, side) in [(cifar, 32), (NetConfig::imagenet("densenet121").unwrap(), 224)] {
        for mode in Mode::ALL {
            for (rank, world) in [(0, 1), (0, 3), (2, 3)] {
                check_on(Recorder::in_job(Group { rank, world }), &cfg, 7, side, mode);
            }
        }
    }
}

/// 16-bit plans (tensors of two bytes, spans of four): a CIFAR network with dropout and an
/// ImageNet preset, every mode.
#[test]
fn sixteen_bit_plans_pass_the_audit() {
    let cifar = NetConfig::cifar(100, 12, true, 0.5, 0.2, 10).unwrap();
    for (cfg, side) in [(cifar, 32), (NetConfig::imagenet("densenet121").unwrap(), 224)] {
        for precision in [Precision::Bf16, Precision::Fp16] {
            let cfg = NetConfig { precision, ..cfg.clone() };
            for mode in Mode::ALL {
                for n in [1, 3, 64] {
                    check(&cfg, n, side, mode);
                }
            }
        }
    }
}

/// The audit fails where it must: a tensor read after another one that shares its memory
/// overwrote it, and a scratch tensor read before anything wrote it.
#[test]
fn the_audit_finds_overlapping_live_ranges_and_unwritten_reads() {
    use densenet::model::audit::{Op, Operand};
    // With dropout, a transition convolves before it pools, its output in shared scratch.
    let cfg = NetConfig::cifar(16, 4, true, 0.5, 0.2, 10).unwrap();
    let m = Model::new(cfg, 2, 16, 16, Mode::Minimal, 1, Recorder::new()).unwrap();
    let plan = m.plan();
    // Two scratch tensors placed in the same bytes (never live at once): a layer's z and a
    // transition's z.
    let z = plan.layers[0][0].bottleneck.unwrap().z;
    let densenet::model::plan::Order::ConvFirst { z: tz, .. } = plan.transitions[0].order else {
        panic!("a transition with dropout convolves first")
    };
    assert!(z.overlaps(&tz) && z.tag != tz.tag);
    let op = |name, reads: &[View], writes: &[View]| Op {
        name,
        reads: reads.iter().map(|&v| Operand::View(v)).collect(),
        writes: writes.iter().map(|&v| Operand::View(v)).collect(),
    };
    use densenet::backend::View;
    let fine = [op("a", &[], &[z]), op("b", &[z], &[]), op("c", &[], &[tz]), op("d", &[tz], &[])];
    let report = audit(plan, &fine).unwrap();
    assert!(report
        .live
        .iter()
        .any(|(name, first, last)| name == "block1.layer.0 z" && (*first, *last) == (0, Some(1))));
    let clobbered = [op("a", &[], &[z]), op("c", &[], &[tz]), op("b", &[z], &[])];
    let e = audit(plan, &clobbered).unwrap_err().0;
    assert!(
        e.contains("op 2 (b) reads 'block1.layer.0 z") && e.contains("overwritten by op 1 (c) as 'trans1 z"),
        "{e}"
    );
    let e = audit(plan, &[op("b", &[z], &[])]).unwrap_err().0;
    assert!(e.contains("op 0 (b) reads 'block1.layer.0 z") && e.contains("never written"), "{e}");
    // The zeroed arena counts as written for the lasting regions only (the momentum's first
    // step reads its zeros); a scratch tensor must be written in the pass that reads it.
    use densenet::backend::{DType, Span};
    let arena = Operand::Span(Span { off: 0, len: plan.len / 4, dtype: DType::F32, tag: 0 });
    let allocate = || Op { name: "allocate", reads: vec![], writes: vec![arena] };
    let momentum = Operand::Span(plan.momentum);
    audit(plan, &[allocate(), Op { name: "sgd", reads: vec![momentum], writes: vec![momentum] }]).unwrap();
    let e = audit(plan, &[allocate(), op("b", &[z], &[])]).unwrap_err().0;
    assert!(e.contains("op 1 (b) reads 'block1.layer.0 z") && e.contains("never written"), "{e}");
    // A view that strays out of its region.
    let stray = View { off: z.off + 1, ..z };
    let e = audit(plan, &[op("a", &[], &[stray])]).unwrap_err().0;
    assert!(e.contains("lies outside its region"), "{e}");
}
