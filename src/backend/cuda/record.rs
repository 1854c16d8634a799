//! Recorded steps, kept the same way by both executors: between `capture_begin` and
//! `capture_end` every op runs as it is issued and is noted; a step one of whose ops failed is
//! not stored (and a stale one under its key is dropped, so it is recorded afresh); a stored
//! step is found by its key and replayed. What a step is stored as is the executor's: a CUDA
//! graph on the GPU (or its ops when the capture failed), the op list on the host device.

use std::collections::HashMap;

use super::launch::{Arg, Launch};
use crate::backend::{Collective, ConvSpec, Span, View};
use crate::{bail, Result};

/// One unit of an executor's work, owned: what a recorded step keeps.
pub(super) enum Op {
    /// A kernel launch ([`Launch`] with its arguments).
    Launch { kernel: &'static str, grid: [u32; 3], block: [u32; 3], shared: u32, args: Vec<Arg> },
    /// [`Exec::conv_forward`](super::Exec::conv_forward)`(x, w, y, spec)`.
    ConvForward(View, Span, View, ConvSpec),
    /// [`Exec::conv_backward_data`](super::Exec::conv_backward_data)`(gy, w, gx, spec)`.
    ConvBackwardData(View, Span, View, ConvSpec),
    /// [`Exec::conv_backward_filter`](super::Exec::conv_backward_filter)`(x, gy, gw, spec,
    /// accumulate)`.
    ConvBackwardFilter(View, View, Span, ConvSpec, bool),
    /// [`Exec::collective`](super::Exec::collective).
    Collective(Collective),
}

impl Op {
    /// The owned copy of a launch.
    pub(super) fn launch(l: &Launch) -> Op {
        Op::Launch { kernel: l.kernel, grid: l.grid, block: l.block, shared: l.shared, args: l.args.to_vec() }
    }
}

/// The step being recorded, if any, and the stored steps by key, each an `S`.
pub(super) struct Steps<S> {
    /// The ops of the step being recorded (between `capture_begin` and `capture_end`).
    recording: Option<Vec<Op>>,
    /// Whether an op of the step being recorded failed (or something it needs cannot be
    /// recorded): [`Steps::end`] then abandons the recording.
    failed: bool,
    stored: HashMap<u64, S>,
}

impl<S> Steps<S> {
    /// No recording, nothing stored.
    pub(super) fn new() -> Self {
        Steps { recording: None, failed: false, stored: HashMap::new() }
    }

    /// Whether a step is being recorded.
    pub(super) fn recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Starts recording a step (`capture_begin`).
    pub(super) fn begin(&mut self) -> Result<()> {
        if self.recording() {
            bail!("capture_begin while a step is being recorded");
        }
        self.recording = Some(Vec::new());
        self.failed = false;
        Ok(())
    }

    /// Notes `op`, which ran with result `r`, when a step is being recorded: a failed op
    /// abandons the recording instead (it is not part of a step that can be replayed).
    pub(super) fn note(&mut self, op: Op, r: &Result<()>) {
        if let Some(ops) = &mut self.recording {
            match r {
                Ok(()) => ops.push(op),
                Err(_) => self.failed = true,
            }
        }
    }

    /// Abandons the step being recorded, if any: something it needs cannot be replayed.
    pub(super) fn abandon(&mut self) {
        if self.recording() {
            self.failed = true;
        }
    }

    /// Ends the recording (`capture_end`) and returns the step's ops, to be stored as step `key`
    /// with [`Steps::store`]; an error when none was begun, or when it was abandoned (then a
    /// step stored under `key` is dropped too, so that the step is recorded afresh).
    pub(super) fn end(&mut self, key: u64) -> Result<Vec<Op>> {
        let Some(ops) = self.recording.take() else { bail!("capture_end without capture_begin") };
        if std::mem::take(&mut self.failed) {
            self.stored.remove(&key);
            bail!("an op of the step failed while it was recorded: the recording is abandoned");
        }
        Ok(ops)
    }

    /// Stores `step` as step `key`.
    pub(super) fn store(&mut self, key: u64, step: S) {
        self.stored.insert(key, step);
    }
}

/// An executor that records steps into its [`Steps`]: how it issues one op and runs one stored
/// step; `submit` and `replay_stored` are the same for both executors.
pub(super) trait Recorder {
    /// What a step is stored as.
    type Step;

    /// The executor's steps.
    fn steps(&mut self) -> &mut Steps<Self::Step>;

    /// Runs (queues) `op` now, without recording it.
    fn issue(&mut self, op: &Op) -> Result<()>;

    /// Runs a stored step.
    fn issue_step(&mut self, step: &Self::Step) -> Result<()>;

    /// Runs (queues) `ops` in order, up to the first that fails.
    fn issue_ops(&mut self, ops: &[Op]) -> Result<()> {
        ops.iter().try_for_each(|op| self.issue(op))
    }

    /// Runs `op` now, and notes it when a step is being recorded ([`Steps::note`]).
    fn submit(&mut self, op: Op) -> Result<()> {
        let r = self.issue(&op);
        self.steps().note(op, &r);
        r
    }

    /// Runs stored step `key`; `false` when there is none (nothing ran).
    fn replay_stored(&mut self, key: u64) -> Result<bool> {
        let Some(step) = self.steps().stored.remove(&key) else { return Ok(false) };
        let r = self.issue_step(&step);
        self.steps().store(key, step);
        r.map(|()| true)
    }
}

/// The [`Exec`](super::Exec) methods both executors implement alike, through [`Recorder`]:
/// each convolution is submitted as an [`Op`], and steps begin and replay in [`Steps`].
/// Expanded inside each executor's `impl Exec`, where `View`, `Span`, `ConvSpec`,
/// `Collective`, `Op` and `Result` are in scope.
macro_rules! recorded_exec_methods {
    () => {
        fn conv_forward(&mut self, x: View, w: Span, y: View, spec: ConvSpec) -> Result<()> {
            self.submit(Op::ConvForward(x, w, y, spec))
        }

        fn conv_backward_data(&mut self, gy: View, w: Span, gx: View, spec: ConvSpec) -> Result<()> {
            self.submit(Op::ConvBackwardData(gy, w, gx, spec))
        }

        fn conv_backward_filter(
            &mut self,
            x: View,
            gy: View,
            gw: Span,
            spec: ConvSpec,
            accumulate: bool,
        ) -> Result<()> {
            self.submit(Op::ConvBackwardFilter(x, gy, gw, spec, accumulate))
        }

        fn collective(&mut self, op: Collective) -> Result<()> {
            self.submit(Op::Collective(op))
        }

        fn capture_begin(&mut self) -> Result<()> {
            self.steps().begin()
        }

        fn replay(&mut self, key: u64) -> Result<bool> {
            self.replay_stored(key)
        }
    };
}
pub(super) use recorded_exec_methods;
