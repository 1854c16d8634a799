//! The plan audited by live ranges (llm.c's audited offsets, made mechanical). A training step
//! and an evaluation run on a [`Recorder`], a backend that only records every op with what it
//! reads and writes; [`audit`] replays the trace against the plan:
//! - every view and tagged span lies inside the region of its tensor (its [`View::tag`]),
//!   every untagged span inside one region;
//! - every float an op reads was written before, through the tensor the op reads it as: no op
//!   writes over a tensor that a later op still reads (two tensors that share memory must
//!   have disjoint live ranges), and nothing is read that was never written (the zeroed
//!   arena counts as written for the lasting regions, the state that outlasts a step: every
//!   other tensor is written in a pass before it is read);
//! - and it derives each tensor's live range: from its first write to its last read.

use super::plan::{Plan, Region};
use crate::backend::{Affine, Backend, Bn, Collective, ConvShape, ConvSpec, DType, Matrix, Moments, Span, View};
use crate::comm::Group;
use crate::input::{Crop, Normalize};
use crate::{bail, Error, Result};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;

/// An operand of a recorded op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// A tensor view.
    View(View),
    /// A span (weights, statistics, logits: a tagged span is its tensor's, an untagged one the
    /// region's).
    Span(Span),
}

/// One recorded op: its name and what it reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// The backend method.
    pub name: &'static str,
    /// Operands read.
    pub reads: Vec<Operand>,
    /// Operands written.
    pub writes: Vec<Operand>,
}

/// A backend that computes nothing and records every op (reads of the arena by the host
/// included): the trace [`audit`] checks.
#[derive(Default)]
pub struct Recorder {
    ops: RefCell<Vec<Op>>,
    /// The data-parallel job it acts as a rank of, if any.
    group: Option<Group>,
}

impl Recorder {
    /// A recorder with an empty trace.
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// A recorder acting as rank `group.rank` of a data-parallel job (its collectives recorded,
    /// its plan with the collectives' scratch).
    pub fn in_job(group: Group) -> Recorder {
        Recorder { group: Some(group), ..Recorder::default() }
    }

    /// The ops recorded so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.borrow().clone()
    }

    fn push(&self, name: &'static str, reads: Vec<Operand>, writes: Vec<Operand>) {
        self.ops.borrow_mut().push(Op { name, reads, writes });
    }
}

/// The name of the op that allocates the zeroed arena: every lasting region holds zeros of its
/// own tensor.
const ALLOCATE: &str = "allocate";

fn v(view: View) -> Operand {
    Operand::View(view)
}

fn s(span: Span) -> Operand {
    Operand::Span(span)
}

fn m(matrix: Matrix) -> Operand {
    Operand::Span(matrix.data)
}

/// The operands of a BN's mean, variance, scale and shift.
fn bn(b: Bn) -> [Operand; 4] {
    b.spans().map(s)
}

impl Backend for Recorder {
    fn describe(&self) -> String {
        "recorder (the plan audit)".into()
    }

    fn stores(&self, _: DType) -> bool {
        true
    }

    fn workspace_len(&mut self, _convs: &[ConvShape], _image_len: usize, _batch: usize) -> Result<usize> {
        Ok(0)
    }

    fn allocate(&mut self, len: usize, _workspace: Span, _max_batch: usize) -> Result<()> {
        // The arena starts zeroed (the momentum's first step reads those zeros).
        self.push(ALLOCATE, vec![], vec![s(Span { off: 0, len, dtype: DType::F32, tag: 0 })]);
        Ok(())
    }

    fn write(&mut self, dst: Span, _data: &[f32]) {
        self.push("write", vec![], vec![s(dst)]);
    }

    fn read_into(&self, src: Span, out: &mut [f32]) {
        out.fill(0.0);
        self.push("read", vec![s(src)], vec![]);
    }

    fn set_labels(&mut self, _labels: &[u32]) {}

    fn copy(&mut self, src: View, dst: View) {
        self.push("copy", vec![v(src)], vec![v(dst)]);
    }

    fn augment(&mut self, _bytes: &[u8], _crops: &[Crop], _norm: &Normalize, _scale: usize, dst: View) {
        self.push("augment", vec![], vec![v(dst)]);
    }

    fn conv_forward(&mut self, x: View, pre: Option<Bn>, w: Span, y: View, _spec: ConvSpec) {
        let mut reads = vec![v(x), s(w)];
        reads.extend(pre.into_iter().flat_map(bn));
        self.push("conv_forward", reads, vec![v(y)]);
    }

    fn conv_backward_data(&mut self, gy: View, w: Span, gx: View, _spec: ConvSpec) {
        self.push("conv_backward_data", vec![v(gy), s(w)], vec![v(gx)]);
    }

    fn conv_backward_filter(
        &mut self,
        x: View,
        pre: Option<Bn>,
        gy: View,
        gw: Span,
        _spec: ConvSpec,
        accumulate: bool,
    ) {
        let mut reads = vec![v(x), v(gy)];
        reads.extend(pre.into_iter().flat_map(bn));
        reads.extend(accumulate.then(|| s(gw)));
        self.push("conv_backward_filter", reads, vec![s(gw)]);
    }

    fn bn_stats(&mut self, x: View, out: Moments) {
        self.push("bn_stats", vec![v(x)], vec![s(out.mean), s(out.var)]);
    }

    fn bn_update_running(&mut self, batch: Moments, running: Moments, _count: usize, _momentum: f32, flag: Span) {
        // The flag is set or left: a write, not a read.
        let reads = vec![s(batch.mean), s(batch.var), s(running.mean), s(running.var)];
        self.push("bn_update_running", reads, vec![s(running.mean), s(running.var), s(flag)]);
    }

    fn bn_relu(&mut self, x: View, b: Bn, y: View) {
        let mut reads = vec![v(x)];
        reads.extend(bn(b));
        self.push("bn_relu", reads, vec![v(y)]);
    }

    fn bn_relu_backward(&mut self, g: View, x: View, b: Bn, grad: Affine, dx: View, accumulate: bool) {
        let mut reads = vec![v(g), v(x)];
        reads.extend(bn(b));
        if accumulate {
            reads.push(v(dx));
        }
        self.push("bn_relu_backward", reads, vec![s(grad.gamma), s(grad.beta), v(dx)]);
    }

    fn bn_relu_backward_sums(&mut self, g: View, x: View, b: Bn, grad: Affine, sums: Span) {
        let mut reads = vec![v(g), v(x)];
        reads.extend(bn(b));
        self.push("bn_relu_backward_sums", reads, vec![s(grad.gamma), s(grad.beta), s(sums)]);
    }

    fn bn_relu_backward_data(&mut self, g: View, x: View, b: Bn, (sums, _): (Span, usize), dx: View, accumulate: bool) {
        let mut reads = vec![v(g), v(x), s(sums)];
        reads.extend(bn(b));
        if accumulate {
            reads.push(v(dx));
        }
        self.push("bn_relu_backward_data", reads, vec![v(dx)]);
    }

    fn bn_stats_combine(&mut self, parts: Span, _batch: usize, _hw: usize, out: Moments) {
        self.push("bn_stats_combine", vec![s(parts)], vec![s(out.mean), s(out.var)]);
    }

    fn group(&self) -> Option<Group> {
        self.group
    }

    fn collective(&mut self, op: Collective) {
        // A collective's spans must fit it whatever their live ranges (a bug, not a plan's).
        op.check(self.group.map_or(1, |g| g.world)).unwrap_or_else(|e| panic!("{e}"));
        match op {
            Collective::AllReduce { src, dst } | Collective::AllGather { src, dst } => {
                self.push("collective", vec![s(src)], vec![s(dst)])
            }
            Collective::Broadcast(span) => self.push("collective", vec![s(span)], vec![s(span)]),
        }
    }

    fn dropout(&mut self, x: View, _p: f32, _key: u64) {
        self.push("dropout", vec![v(x)], vec![v(x)]);
    }

    fn avg_pool2(&mut self, x: View, y: View) {
        self.push("avg_pool2", vec![v(x)], vec![v(y)]);
    }

    fn avg_pool2_backward(&mut self, gy: View, gx: View) {
        self.push("avg_pool2_backward", vec![v(gy)], vec![v(gx)]);
    }

    fn max_pool3(&mut self, x: View, pre: Option<Bn>, y: View) {
        let mut reads = vec![v(x)];
        reads.extend(pre.into_iter().flat_map(bn));
        self.push("max_pool3", reads, vec![v(y)]);
    }

    fn max_pool3_backward(&mut self, x: View, pre: Option<Bn>, gy: View, gx: View) {
        let mut reads = vec![v(x), v(gy)];
        reads.extend(pre.into_iter().flat_map(bn));
        self.push("max_pool3_backward", reads, vec![v(gx)]);
    }

    fn global_avg_pool(&mut self, x: View, y: Matrix) {
        self.push("global_avg_pool", vec![v(x)], vec![m(y)]);
    }

    fn global_avg_pool_backward(&mut self, gy: Matrix, gx: View) {
        self.push("global_avg_pool_backward", vec![m(gy)], vec![v(gx)]);
    }

    fn linear(&mut self, x: Matrix, w: Matrix, b: Span, y: Matrix) {
        self.push("linear", vec![m(x), m(w), s(b)], vec![m(y)]);
    }

    fn linear_backward(&mut self, x: Matrix, w: Matrix, gy: Matrix, gx: Matrix, gw: Matrix, gb: Span) {
        self.push("linear_backward", vec![m(x), m(w), m(gy)], vec![m(gx), m(gw), s(gb)]);
    }

    fn softmax_xent(&mut self, logits: Matrix, _total: usize, out: Span, glogits: Matrix) {
        self.push("softmax_xent", vec![m(logits)], vec![s(out), m(glogits)]);
    }

    fn scale_loss_grad(&mut self, g: Matrix, scaler: Span) {
        self.push("scale_loss_grad", vec![m(g), s(scaler)], vec![m(g)]);
    }

    fn unscale_grads(&mut self, grads: Span, scaler: Span) {
        self.push("unscale_grads", vec![s(grads), s(scaler)], vec![s(grads), s(scaler)]);
    }

    fn update_scale(&mut self, scaler: Span) {
        self.push("update_scale", vec![s(scaler)], vec![s(scaler)]);
    }

    fn sgd(&mut self, params: Span, grads: Span, momentum: Span, settings: Span, skip: Span, flag: Span) {
        // The flag is set or left: a write, not a read.
        let reads = vec![s(grads), s(params), s(momentum), s(settings), s(skip)];
        self.push("sgd", reads, vec![s(params), s(momentum), s(flag)]);
    }
}

/// What [`audit`] found: each tensor's live range, by tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audit {
    /// For every tag written: (the tag's name, index of the first op writing it, index of
    /// the last op reading it, if any).
    pub live: Vec<(String, usize, Option<usize>)>,
}

/// Checks the trace `ops` of a model planned by `plan` (see the module docs); the error names
/// the op, the tensor and the one that overwrote it.
pub fn audit(plan: &Plan, ops: &[Op]) -> Result<Audit> {
    let name = |tag: u32| plan.tags.get(tag as usize - 1).map_or("?", |t| t.name.as_str()).to_string();
    // Each operand as its tag and arena ranges, checked against its region.
    let resolve = |i: usize, o: &Operand| -> Result<(u32, Vec<(usize, usize)>)> {
        let op = &ops[i].name;
        match *o {
            Operand::View(view) => {
                let tag = plan
                    .tags
                    .get((view.tag as usize).wrapping_sub(1))
                    .ok_or_else(|| Error(format!("op {i} ({op}): view {view:?} has no tag of the plan")))?;
                let r = &plan.regions[tag.region];
                if view.numel() > 0 && (view.off < r.off || view.end() > r.end() || view.dtype != r.dtype) {
                    bail!("op {i} ({op}): view of '{}' {view:?} lies outside its region", tag.name);
                }
                Ok((view.tag, view.ranges().collect()))
            }
            Operand::Span(span) => {
                let inside = |r: &Region| r.off <= span.off && span.end() <= r.end() && r.dtype == span.dtype;
                let r = match span.tag {
                    0 => plan.regions.iter().find(|r| inside(r)),
                    t => plan.tags.get(t as usize - 1).map(|t| &plan.regions[t.region]).filter(|r| inside(r)),
                };
                let r = r.ok_or_else(|| Error(format!("op {i} ({op}): {span:?} lies in no region of its tensor")))?;
                let tag = if span.tag == 0 { r.tag } else { span.tag };
                Ok((tag, vec![(span.off, span.end())]))
            }
        }
    };
    let mut owner = Owners::default();
    let mut live: BTreeMap<u32, (usize, Option<usize>)> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        for o in &op.reads {
            let (tag, ranges) = resolve(i, o)?;
            for (r_start, r_end) in ranges {
                let r = r_start..r_end;
                let mut covered = 0;
                for (part, by, writer) in owner.of(r.clone()) {
                    if by != tag {
                        bail!(
                            "op {i} ({}) reads '{}' at {}, overwritten by op {writer} ({}) as '{}': their live \
                             ranges overlap",
                            op.name,
                            name(tag),
                            part.start,
                            ops[writer].name,
                            name(by)
                        );
                    }
                    covered += part.len();
                }
                if covered < r.len() {
                    bail!("op {i} ({}) reads '{}' at {}, never written", op.name, name(tag), r.start);
                }
            }
            if let Some(l) = live.get_mut(&tag) {
                l.1 = Some(i);
            }
        }
        if op.name == ALLOCATE {
            for r in plan.regions.iter().filter(|r| r.lasting) {
                owner.write(r.off..r.end(), r.tag, i);
            }
            continue;
        }
        for o in &op.writes {
            let (tag, ranges) = resolve(i, o)?;
            for (start, end) in ranges {
                owner.write(start..end, tag, i);
            }
            live.entry(tag).or_insert((i, None));
        }
    }
    Ok(Audit { live: live.into_iter().map(|(tag, (first, last))| (name(tag), first, last)).collect() })
}

/// Who last wrote each stretch of the arena, and as which tensor: sorted, disjoint stretches
/// (the audit's tags, or the placement's regions).
#[derive(Default)]
pub(super) struct Owners(BTreeMap<usize, (usize, u32, usize)>);

impl Owners {
    /// Records that op `op` wrote `r` as tensor `tag`.
    pub(super) fn write(&mut self, r: Range<usize>, tag: u32, op: usize) {
        let owner = &mut self.0;
        if r.is_empty() {
            return;
        }
        // A stretch that starts before `r` and reaches into it keeps its head (and its tail,
        // past `r`); stretches inside `r` go.
        let before: Option<(usize, (usize, u32, usize))> = owner.range(..r.start).next_back().map(|(&a, &b)| (a, b));
        if let Some((a, (end, by, w))) = before {
            if end > r.start {
                owner.insert(a, (r.start, by, w));
                if end > r.end {
                    owner.insert(r.end, (end, by, w));
                }
            }
        }
        let inside: Vec<usize> = owner.range(r.start..r.end).map(|(&a, _)| a).collect();
        for a in inside {
            let (end, by, w) = owner.remove(&a).expect("listed");
            if end > r.end {
                owner.insert(r.end, (end, by, w));
            }
        }
        owner.insert(r.start, (r.end, tag, op));
    }

    /// The written parts of `r`, each with its tensor and the op that wrote it (from the end
    /// of `r` back: the first stretch that ends before its start ends the walk).
    pub(super) fn of(&self, r: Range<usize>) -> impl Iterator<Item = (Range<usize>, u32, usize)> + '_ {
        self.0
            .range(..r.end)
            .rev()
            .take_while(move |(_, &(end, _, _))| end > r.start)
            .map(move |(&start, &(end, by, op))| (start.max(r.start)..end.min(r.end), by, op))
    }
}
