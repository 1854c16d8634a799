//! The kernels compile for the GPU without one: NVRTC (loaded at run time, no driver needed)
//! compiles `kernels::SOURCE` for compute_80 and compute_90 with the options the GPU path uses,
//! and the PTX defines every kernel in `kernels::NAMES` as an unmangled `.entry`. The PTX nvcc
//! embedded at build time, if any, is checked the same way.
//!
//! NVRTC is found by the dynamic loader (`libnvrtc.so.13` on `LD_LIBRARY_PATH`, e.g. pip's
//! `nvidia/cu13/lib`). Without it the test says loudly that it was skipped, unless
//! `DENSENET_REQUIRE_NVRTC=1` (as in CI), which makes that a failure; likewise a build without
//! nvcc fails the PTX check only under `DENSENET_REQUIRE_PTX=1`.

use std::io::Write;

use densenet::backend::cuda::{kernels, ptx, GpuExec};

fn shout(message: &str) {
    let _ = writeln!(std::io::stderr(), "\n{}\n{message}\n{}\n", "!".repeat(78), "!".repeat(78));
}

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Panics unless `ptx` defines every kernel as `.entry name(`.
fn assert_entries(ptx: &str, what: &str) {
    assert!(!kernels::NAMES.is_empty(), "build.rs found no __global__ function in kernels/*.cu");
    let missing: Vec<&str> =
        kernels::NAMES.iter().copied().filter(|n| !ptx.contains(&format!(".entry {n}("))).collect();
    assert!(missing.is_empty(), "{what}: no `.entry` for {missing:?} (kernels must be extern \"C\" __global__)");
}

#[test]
fn nvrtc_compiles_every_kernel() {
    if !GpuExec::nvrtc_available() {
        let why = "NVRTC not found (libnvrtc.so.13 is not on LD_LIBRARY_PATH; pip install nvidia-cuda-nvrtc==13.0.88 \
                   and add its site-packages/nvidia/cu13/lib to LD_LIBRARY_PATH)";
        assert!(!required("DENSENET_REQUIRE_NVRTC"), "{why}, and DENSENET_REQUIRE_NVRTC=1");
        shout(&format!("SKIPPED: {why}"));
        return;
    }
    for arch in [80, 90] {
        let ptx = GpuExec::nvrtc_compile(arch).unwrap_or_else(|e| panic!("{e}"));
        assert!(ptx.contains(&format!(".target sm_{arch}")), "NVRTC's PTX does not target sm_{arch}");
        assert_entries(&ptx, &format!("NVRTC compute_{arch}"));
    }
}

#[test]
fn nvcc_ptx_has_every_kernel() {
    match kernels::PTX {
        Some(ptx) => {
            assert_entries(ptx, "nvcc's PTX");
            // `densenet --version` states the ISA built and the driver it needs.
            let isa = ptx::isa(ptx).expect("nvcc's PTX has a .version directive");
            assert!(kernels::BUILD.contains(&ptx::describe(isa)), "{}", kernels::BUILD);
            assert!(kernels::VERSION.ends_with(kernels::BUILD), "{}", kernels::VERSION);
        }
        None => {
            let why = "no PTX from nvcc in this build (set NVCC=/path/to/nvcc, or put nvcc on PATH, and rebuild)";
            assert!(!required("DENSENET_REQUIRE_PTX"), "{why}, and DENSENET_REQUIRE_PTX=1");
            shout(&format!("SKIPPED: {why}"));
        }
    }
}
