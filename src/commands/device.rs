//! `--device`: which backend runs the model, opened before any data is loaded so that a
//! missing GPU fails fast, with one line saying what is missing.

use super::{parse, usage, Failure};
use clap::Args;
use densenet::backend::cuda::{CudaBackend, Exec, GpuExec, HostExec};
use densenet::backend::{Backend, CpuBackend};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Device {
    /// A GPU when one works, else the CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// The CUDA backend on GPU N.
    Cuda(usize),
    /// The CUDA backend on the host device (kernels on the host layer): slow, for debugging.
    Host,
}

/// Where the model runs.
#[derive(Args, Clone, Copy)]
pub(crate) struct DeviceArgs {
    /// Device: auto (GPU 0 when it works, else the CPU), cpu, cuda, cuda:N, or host (the CUDA
    /// backend with its kernels run on the CPU: slow, for debugging).
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = parse::device)]
    device: Device,
    /// On a GPU, issue every op of every step instead of replaying the step recorded once as a
    /// CUDA graph (debugging, profiling).
    #[arg(long)]
    no_graphs: bool,
    /// Say in full why `--device auto` found no usable GPU (`--device cuda` does too).
    #[arg(short, long)]
    verbose: bool,
}

impl DeviceArgs {
    /// Whether `auto` chooses the device.
    pub(crate) fn is_auto(&self) -> bool {
        self.device == Device::Auto
    }

    /// Whether the model runs on a GPU (when one works, for `auto`).
    pub(crate) fn wants_gpu(&self) -> bool {
        matches!(self.device, Device::Auto | Device::Cuda(_))
    }

    /// Opens the backend of a rank whose local rank is `local` (docs/launch.md): on a GPU, the
    /// one it sees when it sees one (`CUDA_VISIBLE_DEVICES`), else GPU `local`.
    pub(crate) fn open_rank(&self, local: usize) -> Result<(Box<dyn Backend>, String), Failure> {
        match self.device {
            Device::Cuda(n) if n > 0 => {
                Err(usage(format!("--device cuda:{n} names one GPU; a rank uses its own: give --device cuda")))
            }
            Device::Auto | Device::Cuda(_) => {
                let gpu = match GpuExec::count() {
                    Ok(1) => 0,
                    _ => local,
                };
                let device = match self.device {
                    Device::Auto => Device::Auto,
                    _ => Device::Cuda(gpu),
                };
                DeviceArgs { device, ..*self }.open_at(gpu)
            }
            _ => self.open(),
        }
    }

    /// Opens the backend, and says why when `auto` chose it.
    pub(crate) fn open(&self) -> Result<(Box<dyn Backend>, String), Failure> {
        self.open_at(0)
    }

    /// [`DeviceArgs::open`], `auto` trying GPU `auto_gpu`.
    fn open_at(&self, auto_gpu: usize) -> Result<(Box<dyn Backend>, String), Failure> {
        fn cuda<E: Exec + 'static>(exec: E, graphs: bool) -> Box<dyn Backend> {
            let mut be = CudaBackend::new(exec);
            be.set_graphs(graphs);
            Box::new(be)
        }
        let cpu = || -> Box<dyn Backend> { Box::new(CpuBackend::new()) };
        let graphs = !self.no_graphs;
        Ok(match self.device {
            Device::Cpu => (cpu(), String::new()),
            Device::Host => (cuda(HostExec::new(), graphs), String::new()),
            Device::Cuda(n) => (cuda(GpuExec::new(n)?, graphs), String::new()),
            Device::Auto => match GpuExec::new(auto_gpu) {
                Ok(exec) => (cuda(exec, graphs), " (auto)".into()),
                Err(e) if self.verbose => (cpu(), format!(" (auto, no usable GPU: {e})")),
                Err(_) => (cpu(), " (auto: no usable GPU; -v says why)".into()),
            },
        })
    }
}

/// The `Device: ...` line: what runs the model, and why when it was chosen automatically.
pub(crate) fn line(backend: &impl Backend, why: &str) -> String {
    format!("Device: {}{why}", backend.describe())
}
