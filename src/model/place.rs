//! Placement by live range: regions that are never live at the same time share bytes.
//!
//! A training step and an evaluation are recorded on the plan laid out one region after
//! another ([`Recorder`]); a region (one tensor) lives in each pass from each write of some of
//! its bytes to the last read of those bytes (a layer's scratch tensor lives while the layer
//! runs in forward and again in backward, and not between). Two regions may overlap in the arena when none of their ranges meet,
//! in either pass. A tensor whose first touch in a pass reads it holds what an earlier pass
//! or step left there: its region is kept apart like the lasting regions (parameters,
//! gradients, momentum, running statistics, the logits and the loss, the workspace). The
//! regions are then placed largest first, each at the lowest offset clear of every placed
//! region it may not share with (first fit). The audit (`super::audit`) replays the step on
//! the placed plan and proves it safe.

use super::audit::{Op, Operand, Owners, Recorder};
use super::net::Net;
use super::plan::{Plan, Region};
use super::{Model, Pass};
use crate::backend::{aligned, Backend, Sgd};
use crate::config::NetConfig;
use crate::Result;
use std::ops::RangeInclusive;

/// The offset of each of `regions` (a plan's, laid out one after another for `cfg`, built as
/// `net`, on `h` x `w` inputs) placed by live range, in region order; the lives are traced on
/// `plan`, the same layout for a smaller batch (the same regions, in the same order).
pub(super) fn by_live_range(
    cfg: &NetConfig,
    net: &Net,
    plan: &Plan,
    regions: &[Region],
    h: usize,
    w: usize,
) -> Result<Vec<usize>> {
    assert_eq!(plan.regions.len(), regions.len(), "the traced layout has the plan's regions");
    // A training step with the SGD update and an evaluation, as `Model::step` and
    // `Model::evaluate_on` issue them.
    let n = plan.batch;
    let mut m = Model::on_plan(cfg.clone(), net.clone(), plan.clone(), h, w, 0, Recorder::new())?;
    let start = m.be.ops().len();
    m.load_recorded(n);
    m.be.write(m.plan.head.sgd, &Sgd::default().floats());
    m.train_ops(n, true);
    let between = m.be.ops().len();
    m.load_recorded(n);
    m.forward(n, Pass::Eval);
    let ops = m.be.ops();
    let passes = [live(plan, &ops[start..between]), live(plan, &ops[between..])];
    Ok(first_fit(regions, |a, b| {
        let apart = |l: &[Live]| match (&l[a], &l[b]) {
            (Live::Carried, _) | (_, Live::Carried) => false,
            (Live::During(x), Live::During(y)) => {
                x.iter().all(|x| y.iter().all(|y| x.end() < y.start() || y.end() < x.start()))
            }
        };
        !regions[a].lasting && !regions[b].lasting && passes.iter().all(|l| apart(l))
    }))
}

/// A region's life in one pass.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Live {
    /// During these op ranges (none: untouched): from each write of some of its bytes to the
    /// last read of those bytes before they are written again.
    During(Vec<RangeInclusive<usize>>),
    /// Some of it is read before the pass writes it: it holds what came before.
    Carried,
}

/// Each region's life in the pass `ops` of `plan`, byte by byte as the audit follows them:
/// who last wrote each stretch of the arena, and which reads need it.
fn live(plan: &Plan, ops: &[Op]) -> Vec<Live> {
    let region_of = |o: &Operand| match *o {
        Operand::View(v) => plan.tags[v.tag as usize - 1].region,
        Operand::Span(s) if s.tag != 0 => plan.tags[s.tag as usize - 1].region,
        Operand::Span(s) => {
            plan.regions.iter().position(|r| r.off <= s.off && s.end() <= r.end()).expect("in a region")
        }
    };
    let ranges = |o: &Operand| -> Vec<(usize, usize)> {
        match o {
            Operand::View(v) => v.ranges().collect(),
            Operand::Span(s) => vec![(s.off, s.end())],
        }
    };
    // Who last wrote each stretch, by region.
    let mut owner = Owners::default();
    let mut spans: Vec<Vec<RangeInclusive<usize>>> = vec![Vec::new(); plan.regions.len()];
    let mut carried = vec![false; plan.regions.len()];
    for (i, op) in ops.iter().enumerate() {
        for o in &op.reads {
            for (a, b) in ranges(o) {
                let mut covered = 0;
                for (part, region, writer) in owner.of(a..b) {
                    spans[region as usize].push(writer..=i);
                    covered += part.len();
                }
                carried[region_of(o)] |= covered < b - a;
            }
        }
        for o in &op.writes {
            let r = region_of(o);
            for (a, b) in ranges(o) {
                owner.write(a..b, r as u32, i);
            }
            spans[r].push(i..=i);
        }
    }
    spans
        .into_iter()
        .zip(carried)
        .map(|(mut d, carried)| match carried {
            true => Live::Carried,
            false => {
                // Merged, so that comparing two regions' lives is short.
                d.sort_by_key(|r| *r.start());
                let mut merged: Vec<RangeInclusive<usize>> = Vec::new();
                for r in d {
                    match merged.last_mut() {
                        Some(m) if *r.start() <= *m.end() + 1 => *m = *m.start()..=(*m.end()).max(*r.end()),
                        _ => merged.push(r),
                    }
                }
                Live::During(merged)
            }
        })
        .collect()
}

/// Offsets for `regions`, largest first, each at the lowest offset where it overlaps no placed
/// region it may not share bytes with (`apart(a, b)`: regions `a` and `b` may share).
fn first_fit(regions: &[Region], apart: impl Fn(usize, usize) -> bool) -> Vec<usize> {
    let size = |i: usize| aligned(regions[i].bytes());
    let mut order: Vec<usize> = (0..regions.len()).collect();
    // Lasting regions first, in their order; then the largest first.
    order.sort_by_key(|&i| (!regions[i].lasting, if regions[i].lasting { i } else { usize::MAX - size(i) }));
    let mut at = vec![0; regions.len()];
    let mut placed: Vec<usize> = Vec::new();
    for i in order {
        let mut blocking: Vec<(usize, usize)> =
            placed.iter().filter(|&&j| !apart(i, j) && size(j) > 0).map(|&j| (at[j], at[j] + size(j))).collect();
        blocking.sort_unstable();
        let mut off = 0;
        for (start, end) in blocking {
            if off + size(i) <= start {
                break;
            }
            off = off.max(end);
        }
        at[i] = off;
        placed.push(i);
    }
    at
}

impl Model<Recorder> {
    /// Records the load of a batch of `n` images (the recorder keeps no data, so none is made:
    /// a plan's batch may be far larger than memory).
    fn load_recorded(&mut self, n: usize) {
        self.be.write(self.plan.image.batch(n).span(), &[]);
        self.be.set_labels(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DType, ALIGN};
    use crate::model::plan::Category;

    fn region(len: usize, lasting: bool) -> Region {
        let (name, category) = (String::new(), Category::Scratch);
        Region { name, category, off: 0, len, dtype: DType::F32, tag: 0, lasting }
    }

    /// Lasting regions one after another at the bottom; a region goes into the lowest gap
    /// among those it may not share with, and on top of those it may.
    #[test]
    fn first_fit_shares_what_may_be_shared() {
        let f = ALIGN / DType::F32.size();
        // 0 lasting; 1 and 2 may share; 3 may share with neither; 4 (small) with 2 only.
        let regions = [region(f, true), region(4 * f, false), region(2 * f, false), region(f, false), region(f, false)];
        let may = |a: usize, b: usize| matches!((a.min(b), a.max(b)), (1, 2) | (2, 4));
        let at = first_fit(&regions, |a, b| !regions[a].lasting && !regions[b].lasting && may(a, b));
        assert_eq!(at, [0, ALIGN, ALIGN, 5 * ALIGN, 6 * ALIGN]);
    }
}
