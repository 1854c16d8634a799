//! The host device: the CUDA backend's own code (which kernels, in which order, with which
//! arguments, on which arena offsets) with the kernels on the host execution layer and the
//! convolutions (cuDNN's part on a GPU) on the CPU backend. A graph is the op list recorded
//! while its step ran, replayed as a GPU replays a CUDA graph.

use super::hostlayer;
use super::launch::{Exec, Launch, Op};
use crate::backend::{Backend, ConvShape, ConvSpec, CpuBackend, DeviceMemory, Span, View};
use crate::{bail, Result};
use std::collections::HashMap;

/// Runs the CUDA backend on the CPU (see the module docs).
pub struct HostExec {
    cpu: CpuBackend,
    recording: Option<Vec<Op>>,
    graphs: HashMap<u64, Vec<Op>>,
    /// An op failed during the recording.
    spoiled: bool,
    /// Bytes of the emulated device allocation.
    len: usize,
    /// Bytes after it (host only): a weight gradient, for accumulating filter gradients.
    spare: usize,
}

impl HostExec {
    /// A host device over rayon's global pool (for the convolutions).
    pub fn new() -> Self {
        HostExec { cpu: CpuBackend::new(), recording: None, graphs: HashMap::new(), spoiled: false, len: 0, spare: 0 }
    }

    /// Runs `op`, and records it while a graph is being captured (a failed op spoils the
    /// recording: `capture_end` then stores nothing).
    fn submit(&mut self, op: Op) -> Result<()> {
        let r = self.execute(&op);
        match (&mut self.recording, &r) {
            (Some(ops), Ok(())) => ops.push(op),
            (Some(_), Err(_)) => self.spoiled = true,
            (None, _) => {}
        }
        r
    }

    fn execute(&mut self, op: &Op) -> Result<()> {
        match *op {
            Op::Launch { kernel, grid, block, shared, ref args } => {
                let arena = self.cpu.bytes_mut();
                return hostlayer::launch(
                    arena.as_mut_ptr(),
                    arena.len(),
                    &Launch { kernel, grid, block, shared, args },
                );
            }
            Op::ConvForward(x, w, y, spec) => self.cpu.conv_forward(x, None, w, y, spec),
            Op::ConvBackwardData(gy, w, gx, spec) => self.cpu.conv_backward_data(gy, w, gx, spec),
            Op::ConvBackwardFilter(x, gy, gw, spec, false) => self.cpu.conv_backward_filter(x, None, gy, gw, spec),
            Op::ConvBackwardFilter(x, gy, gw, spec, true) => {
                // cuDNN's beta = 1: the CPU backend overwrites, so go through the spare area.
                let spare = Span { off: self.len, ..gw };
                self.cpu.conv_backward_filter(x, None, gy, spare, spec);
                let sum: Vec<f32> = self.cpu.read(gw).iter().zip(self.cpu.read(spare)).map(|(a, b)| a + b).collect();
                self.cpu.write(gw, &sum);
            }
        }
        Ok(())
    }

    fn idle(&self, what: &str) -> Result<()> {
        if self.recording.is_some() {
            bail!("{what} while a graph is being captured");
        }
        Ok(())
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

    fn conv_workspace_len(&mut self, convs: &[ConvShape], batch: usize) -> Result<usize> {
        self.spare = 4 * convs.iter().map(|s| s.cout * s.cin * s.spec.k * s.spec.k).max().unwrap_or(0);
        self.cpu.workspace_len(convs, 0, batch)
    }

    fn allocate(&mut self, len: usize, conv_ws: Span) -> Result<()> {
        // Whole f32 for the CPU backend's arena (the labels' words may round it).
        self.len = len.next_multiple_of(4);
        self.cpu.allocate(self.len + self.spare, conv_ws, 0)
    }

    fn memory(&self) -> DeviceMemory {
        DeviceMemory { allocated: self.len, process: None }
    }

    fn write(&mut self, off: usize, data: &[u8]) -> Result<()> {
        self.idle("a host-to-device copy")?;
        let arena = self.cpu.bytes_mut();
        let Some(dst) = off.checked_add(data.len()).and_then(|end| arena.get_mut(off..end)) else {
            bail!("a copy of {} bytes to byte {off} is outside the arena", data.len())
        };
        dst.copy_from_slice(data);
        Ok(())
    }

    fn read_into(&self, off: usize, out: &mut [u8]) -> Result<()> {
        self.idle("a device-to-host copy")?;
        let arena = self.cpu.bytes();
        let Some(src) = off.checked_add(out.len()).and_then(|end| arena.get(off..end)) else {
            bail!("a copy of {} bytes from byte {off} is outside the arena", out.len())
        };
        out.copy_from_slice(src);
        Ok(())
    }

    fn launch(&mut self, l: &Launch) -> Result<()> {
        let op = Op::launch(l);
        self.submit(op)
    }

    fn conv_forward(&mut self, x: View, w: Span, y: View, spec: ConvSpec) -> Result<()> {
        self.submit(Op::ConvForward(x, w, y, spec))
    }

    fn conv_backward_data(&mut self, gy: View, w: Span, gx: View, spec: ConvSpec) -> Result<()> {
        self.submit(Op::ConvBackwardData(gy, w, gx, spec))
    }

    fn conv_backward_filter(&mut self, x: View, gy: View, gw: Span, spec: ConvSpec, accumulate: bool) -> Result<()> {
        self.submit(Op::ConvBackwardFilter(x, gy, gw, spec, accumulate))
    }

    fn capture_begin(&mut self) -> Result<()> {
        self.idle("a capture")?;
        self.recording = Some(Vec::new());
        Ok(())
    }

    fn capture_end(&mut self, key: u64) -> Result<Option<String>> {
        let Some(ops) = self.recording.take() else { bail!("capture_end without capture_begin") };
        if std::mem::take(&mut self.spoiled) {
            bail!("an op of the recorded step failed: nothing recorded");
        }
        self.graphs.insert(key, ops);
        Ok(None)
    }

    fn replay(&mut self, key: u64) -> Result<bool> {
        let Some(ops) = self.graphs.remove(&key) else { return Ok(false) };
        let r = ops.iter().try_for_each(|op| self.execute(op));
        self.graphs.insert(key, ops);
        r.map(|()| true)
    }
}
