//! Build script. The CUDA kernels in `kernels/` are compiled here once the CUDA backend lands
//! (nvcc to PTX when found, otherwise embedded for NVRTC); the CPU build needs nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
