//! The host device: the CUDA backend's own code (which kernels, in which order, with which
//! arguments, on which arena offsets) with the kernels on the host execution layer and the
//! convolutions (cuDNN's part on a GPU) on the CPU backend. A graph is the op list recorded
//! while its step ran, replayed as a GPU replays a CUDA graph.

use std::ops::Range;

use super::host_layer;
use super::launch::{Exec, Launch};
use super::record::{recorded_exec_methods, Op, Recorder, Steps};
use crate::backend::{Backend, Collective, ConvShape, ConvSpec, CpuBackend, DType, DeviceMemory, Span, View};
use crate::comm::rendezvous::Links;
use crate::comm::Group;
use crate::{bail, Result};

/// Runs the CUDA backend on the CPU (see the module docs).
pub struct HostExec {
    cpu: CpuBackend,
    /// The recorded steps, each its op list.
    steps: Steps<Vec<Op>>,
    /// Bytes of the emulated device allocation.
    len: usize,
}

impl HostExec {
    /// A host device over rayon's global pool (for the convolutions).
    pub fn new() -> Self {
        HostExec { cpu: CpuBackend::new(), steps: Steps::new(), len: 0 }
    }

    /// An error when a step is being recorded: `what` cannot be part of it.
    fn idle(&self, what: &str) -> Result<()> {
        if self.steps.recording() {
            bail!("{what} while a graph is being captured");
        }
        Ok(())
    }

    /// The arena bytes of `copy`, `len` bytes `to` or `from` byte `off`, checked: no step is
    /// being recorded, and they are inside the arena.
    fn copy_range(&self, off: usize, len: usize, copy: &str, to: &str) -> Result<Range<usize>> {
        self.idle(copy)?;
        match off.checked_add(len) {
            Some(end) if end <= self.cpu.bytes().len() => Ok(off..end),
            _ => bail!("a copy of {len} bytes {to} byte {off} is outside the arena"),
        }
    }
}

impl Recorder for HostExec {
    type Step = Vec<Op>;

    fn steps(&mut self) -> &mut Steps<Vec<Op>> {
        &mut self.steps
    }

    fn issue(&mut self, op: &Op) -> Result<()> {
        match *op {
            Op::Launch { kernel, grid, block, shared, ref args } => {
                return host_layer::launch(self.cpu.bytes_mut(), &Launch { kernel, grid, block, shared, args });
            }
            Op::ConvForward(x, w, y, spec) => self.cpu.conv_forward(x, None, w, y, spec),
            Op::ConvBackwardData(gy, w, gx, spec) => self.cpu.conv_backward_data(gy, w, gx, spec),
            Op::ConvBackwardFilter(x, gy, gw, spec, accumulate) => {
                self.cpu.conv_backward_filter(x, None, gy, gw, spec, accumulate)
            }
            Op::Collective(c) => return self.cpu.run_collective(c),
        }
        Ok(())
    }

    fn issue_step(&mut self, ops: &Vec<Op>) -> Result<()> {
        self.issue_ops(ops)
    }
}

impl Default for HostExec {
    fn default() -> Self {
        Self::new()
    }
}

impl Exec for HostExec {
    fn describe(&self) -> String {
        format!("host device (CUDA kernels on the host layer, convolutions on the {})", self.cpu.describe())
    }

    fn stores(&self, _: DType) -> bool {
        true
    }

    fn conv_workspace_len(&mut self, convs: &[ConvShape], batch: usize) -> Result<usize> {
        self.cpu.workspace_len(convs, 0, batch)
    }

    fn allocate(&mut self, len: usize, conv_ws: Span) -> Result<()> {
        // Whole f32 for the CPU backend's arena (the labels' words may round it).
        self.len = len.next_multiple_of(DType::F32.size());
        self.cpu.allocate(self.len, conv_ws, 0)
    }

    fn memory(&self) -> DeviceMemory {
        DeviceMemory { allocated: self.len, process: None }
    }

    fn write(&mut self, off: usize, data: &[u8]) -> Result<()> {
        let range = self.copy_range(off, data.len(), "a host-to-device copy", "to")?;
        self.cpu.bytes_mut()[range].copy_from_slice(data);
        Ok(())
    }

    fn read_into(&self, off: usize, out: &mut [u8]) -> Result<()> {
        let range = self.copy_range(off, out.len(), "a device-to-host copy", "from")?;
        out.copy_from_slice(&self.cpu.bytes()[range]);
        Ok(())
    }

    fn launch(&mut self, l: &Launch) -> Result<()> {
        self.submit(Op::launch(l))
    }

    fn join(&mut self, links: Links) -> Result<()> {
        self.cpu.join_host(links);
        Ok(())
    }

    fn group(&self) -> Option<Group> {
        self.cpu.host_group()
    }

    recorded_exec_methods!();

    fn capture_end(&mut self, key: u64) -> Result<Option<String>> {
        let ops = self.steps.end(key)?;
        self.steps.store(key, ops);
        Ok(None)
    }
}
