//! Placement by live range: regions that are never live at the same time share bytes.
//!
//! A training step and an evaluation are recorded on the plan laid out one region after
//! another ([`Recorder`]); each region's live range in each pass is the span of ops from the
//! first that touches it to the last. Two regions may overlap in the arena when their ranges
//! are disjoint in both passes. A region whose first touch in a pass reads it holds what an
//! earlier pass or step left there, and is kept apart like the lasting regions (parameters,
//! gradients, momentum, running statistics, the logits and the loss, the workspace). The
//! regions are then placed largest first, each at the lowest offset clear of every placed
//! region it may not share with (first fit). The audit (`super::audit`) replays the step on
//! the placed plan and proves it safe.

use super::audit::{Op, Operand, Recorder};
use super::net::Net;
use super::plan::{Plan, Region};
use super::{Model, Pass};
use crate::backend::{aligned, Backend, Sgd};
use crate::config::NetConfig;
use crate::Result;
use std::ops::RangeInclusive;

/// The offset of every region of `plan` (laid out one after another for `cfg`, built as `net`,
/// on `h` x `w` inputs) placed by live range, in region order.
pub(super) fn by_live_range(cfg: &NetConfig, net: &Net, plan: &Plan, h: usize, w: usize) -> Result<Vec<usize>> {
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
    Ok(first_fit(&plan.regions, |a, b| {
        let apart = |l: &[Live]| match (&l[a], &l[b]) {
            (Live::Carried, _) | (_, Live::Carried) => false,
            (Live::During(x), Live::During(y)) => x.end() < y.start() || y.end() < x.start(),
            _ => true,
        };
        !plan.regions[a].lasting && !plan.regions[b].lasting && passes.iter().all(|l| apart(l))
    }))
}

/// A region's life in one pass.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Live {
    /// Untouched.
    Idle,
    /// From the first op that touches it (writing) to the last.
    During(RangeInclusive<usize>),
    /// Read before the pass writes it: it holds what came before.
    Carried,
}

/// Each region's life in the pass `ops` of `plan`.
fn live(plan: &Plan, ops: &[Op]) -> Vec<Live> {
    let mut life = vec![Live::Idle; plan.regions.len()];
    let region_of = |o: &Operand| match *o {
        Operand::View(v) => plan.tags[v.tag as usize - 1].region,
        Operand::Span(s) if s.tag != 0 => plan.tags[s.tag as usize - 1].region,
        Operand::Span(s) => {
            plan.regions.iter().position(|r| r.off <= s.off && s.end() <= r.end()).expect("in a region")
        }
    };
    for (i, op) in ops.iter().enumerate() {
        let touched = op.reads.iter().map(|o| (o, true)).chain(op.writes.iter().map(|o| (o, false)));
        for (o, read) in touched {
            let r = region_of(o);
            life[r] = match &life[r] {
                Live::Idle if read => Live::Carried,
                Live::Idle => Live::During(i..=i),
                Live::During(d) => Live::During(*d.start()..=i),
                Live::Carried => Live::Carried,
            };
        }
    }
    life
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
