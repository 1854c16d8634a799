//! `densenet memory`: the plan per category and mode, the largest batch for a budget; and
//! the plan helpers the other commands print with.

use crate::*;

/// One line: the plan's total and its bytes per category, in MiB.
pub(crate) fn plan_line(plan: &Plan) -> String {
    let parts: Vec<String> = Category::ALL.iter().map(|&c| format!("{} {:.1}", c.name(), mib(plan.bytes(c)))).collect();
    format!(
        "Memory plan ({}, batch {}): {:.1} MiB = {} MiB",
        plan.mode,
        plan.batch,
        mib(plan.total_bytes()),
        parts.join(" + ")
    )
}

pub(crate) fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// The plan of `cfg` (built as `net`) for `batch` images in `mode`, its workspace sized by `be`.
pub(crate) fn plan(
    cfg: &NetConfig,
    net: &Net,
    be: &mut CpuBackend,
    batch: usize,
    mode: Mode,
) -> densenet::Result<Plan> {
    Plan::new(cfg, net, batch, SIDE, SIDE, mode, |c| be.workspace_len(c, IMAGE_BYTES, batch))
}

/// The largest batch (up to [`MAX_BATCH`]) whose planned total fits in `budget` bytes, if any
/// does. The total grows with the batch, so a binary search finds it.
pub(crate) fn max_batch(
    cfg: &NetConfig,
    net: &Net,
    be: &mut CpuBackend,
    mode: Mode,
    budget: u64,
) -> densenet::Result<Option<usize>> {
    let mut fits = |batch| plan(cfg, net, be, batch, mode).map(|p| p.total_bytes() as u64 <= budget);
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

pub(crate) fn memory(a: MemoryArgs) -> Result<(), Failure> {
    let cfg = a.net.config().map_err(usage)?;
    let net = Net::new(&cfg);
    let mut be = CpuBackend::new();
    let batch = a.net.batch;
    let mut plans = Vec::new();
    for &mode in &a.memory.0 {
        let fit = a.budget.map(|b| max_batch(&cfg, &net, &mut be, mode, b)).transpose()?;
        plans.push((plan(&cfg, &net, &mut be, batch, mode)?, fit.flatten()));
    }
    let params = net.layout.len;
    if a.json {
        let modes: serde_json::Map<String, serde_json::Value> = plans
            .iter()
            .map(|(p, fit)| {
                let mut m = serde_json::Map::new();
                m.insert("total_bytes".into(), p.total_bytes().into());
                for c in Category::ALL {
                    m.insert(c.name().into(), p.bytes(c).into());
                }
                if a.budget.is_some() {
                    m.insert("max_batch".into(), (*fit).into());
                }
                (p.mode.to_string(), m.into())
            })
            .collect();
        let mut json = serde_json::json!({"network": cfg.name(), "params": params, "batch": batch, "modes": modes});
        if let Some(b) = a.budget {
            json["budget_bytes"] = b.into();
        }
        report(format_args!("{json}"))?;
        return Ok(());
    }
    report(format_args!(
        "{} on {}, batch {batch} of {SIDE}x{SIDE}, {params} parameters; workspace for {} (the CUDA \
         backend's holds the fused-BN scratch and cuDNN's workspace instead: docs/cuda.md)",
        cfg.name(),
        a.net.dataset.title(),
        be.describe()
    ))?;
    if let Some(b) = a.budget {
        report(format_args!(
            "Budget {b} bytes ({:.1} MiB): max batch is the largest batch whose planned total fits",
            mib(b as usize)
        ))?;
    }
    report(format_args!("Planned memory per category, in MiB (2^20 bytes; --json gives bytes):"))?;
    let mut header = format!("{:<8}", "MiB");
    for c in Category::ALL {
        header += &format!(" {:>11}", c.name());
    }
    header += &format!(" {:>11}", "total");
    if a.budget.is_some() {
        header += &format!(" {:>11}", "max batch");
    }
    report(format_args!("{header}"))?;
    for (p, fit) in &plans {
        let mut row = format!("{:<8}", p.mode.to_string());
        for c in Category::ALL {
            row += &format!(" {:>11.1}", mib(p.bytes(c)));
        }
        row += &format!(" {:>11.1}", mib(p.total_bytes()));
        if a.budget.is_some() {
            row += &format!(" {:>11}", fit.map_or("none fits".to_string(), |n| n.to_string()));
        }
        report(format_args!("{row}"))?;
    }
    Ok(())
}
