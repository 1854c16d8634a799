//! `densenet memory`: the plan per category and mode, the largest batch for a budget; and the
//! plan line the other commands print.

use super::args::NetArgs;
use super::output::{report, report_json};
use super::{parse, usage, Outcome};
use clap::Args;
use densenet::backend::{Backend, CpuBackend};
use densenet::config::{NetConfig, Precision};
use densenet::input::CHANNELS;
use densenet::measure::{self, mib};
use densenet::model::floor::floor_bytes;
use densenet::model::net::Net;
use densenet::model::plan::{Category, Mode, Plan};
use densenet::train::recipe::MAX_BATCH;
use serde::Serialize;
use std::collections::BTreeMap;

/// The flags of `densenet memory`.
#[derive(Args)]
pub(crate) struct MemoryArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Memory mode: naive, shared, minimal, or all.
    #[arg(long, value_name = "MODE", default_value = "all", value_parser = parse::one_or_all::<Mode>)]
    memory: parse::OneOrAll<Mode>,
    /// Storage precision of the large tensors: f32, bf16, fp16, or all (side by side;
    /// docs/precision.md).
    #[arg(long, value_name = "P", default_value = "f32", value_parser = parse::one_or_all::<Precision>)]
    precision: parse::OneOrAll<Precision>,
    /// For each mode, also find the largest batch whose planned total fits in SIZE: bytes, or a
    /// number with a unit, B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of
    /// 1024), e.g. 4GiB, 512MB, 1.5GB.
    #[arg(long, value_name = "SIZE", value_parser = measure::parse_size, allow_hyphen_values = true)]
    budget: Option<u64>,
    /// Plan one rank of a data-parallel job of N ranks (`train --nproc N`, docs/launch.md): its
    /// shard of the global batch (the longest, ceil(B/N) images) and the collectives' scratch;
    /// with --budget, the largest global batch whose ranks fit.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse::positive)]
    nproc: usize,
    /// Print one JSON object as the last line instead of the table.
    #[arg(long)]
    json: bool,
}

/// `memory --json`: the plan of each mode asked for, in each precision asked for.
#[derive(Serialize)]
pub(crate) struct MemoryReport {
    /// The network's conventional name.
    network: String,
    /// Trainable parameters.
    params: usize,
    /// The (global) batch planned for.
    batch: usize,
    /// Ranks of the data-parallel job planned for (`--nproc`); the plans are one rank's, for
    /// its shard of `batch`.
    ranks: usize,
    /// The input's height and width.
    image_size: usize,
    /// `--budget`, in bytes (absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_bytes: Option<u64>,
    /// One precision's plans beside the fields above, or several by name.
    #[serde(flatten)]
    plans: Precisions,
}

/// The plans of a [`MemoryReport`]: of one precision, or of several (`--precision all`).
#[derive(Serialize)]
#[serde(untagged)]
enum Precisions {
    One(Box<PrecisionPlans>),
    Several { precisions: BTreeMap<String, PrecisionPlans> },
}

/// One precision's plans in a [`MemoryReport`].
#[derive(Serialize)]
struct PrecisionPlans {
    precision: Precision,
    /// The floor of an exact step (`densenet::model::floor`), which no mode that recomputes
    /// no block features can go below.
    floor_bytes: usize,
    /// The plan of each mode asked for.
    modes: ModePlans,
}

/// The plans of a [`MemoryReport`], by mode (those asked for).
#[derive(Default, Serialize)]
pub(crate) struct ModePlans {
    #[serde(skip_serializing_if = "Option::is_none")]
    naive: Option<ModePlan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shared: Option<ModePlan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    minimal: Option<ModePlan>,
}

impl ModePlans {
    /// The plans of `plans` (each with its budget's answer), against the floor `floor`.
    fn of(plans: &[(Plan, Option<Option<usize>>)], floor: usize) -> ModePlans {
        let mut modes = ModePlans::default();
        for (plan, fit) in plans {
            let slot = match plan.mode {
                Mode::Naive => &mut modes.naive,
                Mode::Shared => &mut modes.shared,
                Mode::Minimal => &mut modes.minimal,
            };
            *slot = Some(ModePlan::of(plan, *fit, floor));
        }
        modes
    }
}

/// One mode's plan in a [`MemoryReport`]: bytes per category and in all.
#[derive(Serialize)]
pub(crate) struct ModePlan {
    total_bytes: usize,
    /// `total_bytes` over the floor.
    ratio_to_floor: f64,
    parameters: usize,
    gradients: usize,
    momentum: usize,
    activations: usize,
    scratch: usize,
    workspace: usize,
    /// With `--budget`: the largest (global) batch that fits, `null` when not even one image
    /// per rank does.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_batch: Option<Option<usize>>,
}

impl ModePlan {
    /// `plan`'s bytes; `fit`: the budget's answer, when one was asked; `floor`: the floor's
    /// bytes.
    fn of(plan: &Plan, fit: Option<Option<usize>>, floor: usize) -> ModePlan {
        let b = |c| plan.bytes(c);
        ModePlan {
            total_bytes: plan.total_bytes(),
            ratio_to_floor: plan.total_bytes() as f64 / floor as f64,
            parameters: b(Category::Parameters),
            gradients: b(Category::Gradients),
            momentum: b(Category::Momentum),
            activations: b(Category::Activations),
            scratch: b(Category::Scratch),
            workspace: b(Category::Workspace),
            max_batch: fit,
        }
    }
}

/// One line: the plan's total and its bytes per category, in MiB.
pub(crate) fn plan_line(plan: &Plan) -> String {
    let parts: Vec<String> = Category::ALL.iter().map(|&c| format!("{} {:.1}", c.name(), mib(plan.bytes(c)))).collect();
    format!(
        "Memory plan ({}, {}, batch {}): {:.1} MiB = {} MiB",
        plan.mode,
        plan.precision,
        plan.batch,
        mib(plan.total_bytes()),
        parts.join(" + ")
    )
}

/// What is planned for: a network (built as `net`), its input side, and the ranks of the job.
struct Planned<'a> {
    cfg: &'a NetConfig,
    net: &'a Net,
    size: usize,
    ranks: usize,
}

/// The plan of `p` for `batch` images per rank in `mode`, its workspace sized by `be`.
fn plan(p: &Planned, be: &mut CpuBackend, batch: usize, mode: Mode) -> densenet::Result<Plan> {
    let image_len = CHANNELS * p.size * p.size;
    let plan = Plan::new(p.cfg, p.net, batch, p.size, p.size, mode, |c| be.workspace_len(c, image_len, batch))?;
    Ok(plan.for_job((p.ranks > 1).then_some(p.ranks), p.net))
}

/// The largest batch per rank (up to [`MAX_BATCH`]) whose planned total fits in `budget`
/// bytes, if any does. The total grows with the batch, so a binary search finds it.
fn max_batch(p: &Planned, be: &mut CpuBackend, mode: Mode, budget: u64) -> densenet::Result<Option<usize>> {
    let mut fits = |batch| plan(p, be, batch, mode).map(|p| p.total_bytes() as u64 <= budget);
    if !fits(1)? {
        return Ok(None);
    }
    if fits(MAX_BATCH)? {
        return Ok(Some(MAX_BATCH));
    }
    // `lo` fits, `hi` does not.
    let (mut lo, mut hi) = (1, MAX_BATCH);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

/// Runs `densenet memory`.
pub(crate) fn run(a: MemoryArgs) -> Outcome {
    let cfg = a.net.config(a.net.free_classes()).map_err(usage)?;
    let size = a.net.image_size();
    cfg.geometry(size, size).map_err(usage)?;
    let net = Net::new(&cfg);
    let mut be = CpuBackend::new();
    let (batch, ranks) = (a.net.batch, a.nproc);
    if batch < ranks {
        return Err(usage(format!("a batch of {batch} leaves a rank of {ranks} without an image")));
    }
    // One rank's shard: the longest.
    let shard = densenet::comm::shard(batch, ranks, 0).len();
    // Each precision asked for: its floor and the plan of each mode, with its budget's answer
    // (a global batch: every rank takes as many images).
    let mut all = Vec::new();
    for &precision in &a.precision.0 {
        let cfg = NetConfig { precision, ..cfg.clone() };
        let planned = Planned { cfg: &cfg, net: &net, size, ranks };
        let mut plans = Vec::new();
        for &mode in &a.memory.0 {
            let fit = a.budget.map(|b| max_batch(&planned, &mut be, mode, b)).transpose()?;
            let fit = fit.map(|f| f.map(|per| per.saturating_mul(ranks)));
            plans.push((plan(&planned, &mut be, shard, mode)?, fit));
        }
        all.push((precision, floor_bytes(&cfg, shard, size, size)?, plans));
    }
    let params = net.layout.len;
    if a.json {
        let mut each = all.iter().map(|(precision, floor, plans)| {
            (
                precision.to_string(),
                PrecisionPlans { precision: *precision, floor_bytes: *floor, modes: ModePlans::of(plans, *floor) },
            )
        });
        let plans = match all.len() {
            1 => Precisions::One(Box::new(each.next().expect("one").1)),
            _ => Precisions::Several { precisions: each.collect() },
        };
        let report =
            MemoryReport { network: cfg.name(), params, batch, ranks, image_size: size, budget_bytes: a.budget, plans };
        return Ok(report_json(&report)?);
    }
    report(format_args!(
        "{}, {} classes, batch {batch} of {size}x{size}, {params} parameters; workspace for {} (the CUDA \
         backend's holds the fused-BN scratch and cuDNN's workspace instead: docs/cuda.md)",
        cfg.name(),
        cfg.num_classes,
        be.describe()
    ))?;
    if ranks > 1 {
        report(format_args!(
            "One rank of {ranks} (--nproc): its shard of {shard} images, and the collectives' scratch; max batch is \
             the global batch"
        ))?;
    }
    if let Some(b) = a.budget {
        report(format_args!(
            "Budget {b} bytes ({:.1} MiB): max batch is the largest batch whose planned total fits",
            mib(b as usize)
        ))?;
    }
    let floors: Vec<String> = all.iter().map(|(p, floor, _)| format!("{:.1} MiB in {p}", mib(*floor))).collect();
    report(format_args!(
        "Floor of an exact step (parameters, gradients, momentum, running statistics, input, and at the worst \
         point the features of blocks 1..b with block b's gradient): {}",
        floors.join(", ")
    ))?;
    report(
        "Planned memory per category, in MiB (2^20 bytes; --json gives bytes); regions never live at the same \
         time share bytes, so the categories add up to more than the total:",
    )?;
    let cell = |text: &str| format!(" {text:>11}");
    let mut header = format!("{:<13}", "MiB");
    for c in Category::ALL {
        header += &cell(c.name());
    }
    header += &cell("total");
    header += &cell("x floor");
    if a.budget.is_some() {
        header += &cell("max batch");
    }
    report(header)?;
    for (precision, floor, plans) in &all {
        for (p, fit) in plans {
            let mut row = format!("{:<13}", format!("{} {precision}", p.mode));
            for c in Category::ALL {
                row += &cell(&format!("{:.1}", mib(p.bytes(c))));
            }
            row += &cell(&format!("{:.1}", mib(p.total_bytes())));
            row += &cell(&format!("{:.2}", p.total_bytes() as f64 / *floor as f64));
            if let Some(fit) = fit {
                row += &cell(&fit.map_or("none fits".to_string(), |n| n.to_string()));
            }
            report(row)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_has_the_readmes_schema() {
        let plan = |max_batch| ModePlan {
            total_bytes: 21,
            ratio_to_floor: 2.1,
            parameters: 1,
            gradients: 2,
            momentum: 3,
            activations: 4,
            scratch: 5,
            workspace: 6,
            max_batch,
        };
        let one = |precision, fit: Option<Option<usize>>| PrecisionPlans {
            precision,
            floor_bytes: 10,
            modes: ModePlans { naive: Some(plan(fit)), shared: None, minimal: Some(plan(fit)) },
        };
        let report = |budget_bytes, fit: Option<Option<usize>>, several: bool| MemoryReport {
            network: "DenseNet-BC-100-12".into(),
            params: 769_162,
            batch: 64,
            ranks: 1,
            image_size: 32,
            budget_bytes,
            plans: match several {
                false => Precisions::One(Box::new(one(Precision::Bf16, fit))),
                true => Precisions::Several {
                    precisions: Precision::ALL.iter().map(|&p| (p.to_string(), one(p, fit))).collect(),
                },
            },
        };
        for several in [false, true] {
            for r in [
                report(None, None, several),
                report(Some(1 << 30), Some(Some(128)), several),
                report(Some(1), Some(None), several),
            ] {
                crate::commands::output::schema::check("densenet memory --json", &r);
            }
        }
    }
}
