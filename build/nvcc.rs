//! Compiles the kernels to PTX with nvcc when one is found.
//!
//! nvcc is looked up in `$NVCC` (`NVCC=none` skips it), then `$CUDA_HOME/bin/nvcc`,
//! `$CUDA_PATH/bin/nvcc`, the `PATH`, and `/usr/local/cuda/bin/nvcc`. The PTX targets
//! `compute_XY` from `$DENSENET_CUDA_ARCH` (`sm_90`, `compute_90` or `90`), else the oldest
//! architecture from 7.0 up that this nvcc supports (PTX runs on every newer GPU through the
//! driver's JIT). Without nvcc, or when it fails, the build goes on without PTX (a
//! `cargo:warning` says why) and the source is compiled with NVRTC at first use.

use std::path::{Path, PathBuf};
use std::process::Command;

/// PTX for `cu`, written to `out`, or `None` without nvcc.
pub fn compile(cu: &Path, out: &Path) -> Option<PathBuf> {
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "DENSENET_CUDA_ARCH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = find_nvcc()?;
    let arch = match std::env::var("DENSENET_CUDA_ARCH") {
        Ok(a) if !a.trim().is_empty() => match parse_arch(&a) {
            Some(a) => a,
            None => {
                println!("cargo:warning=DENSENET_CUDA_ARCH={a:?} is not an architecture like sm_90; using the default");
                default_arch(&nvcc)
            }
        },
        _ => default_arch(&nvcc),
    };
    let ptx = out.join("kernels.ptx");
    let result = Command::new(&nvcc)
        .arg("--ptx")
        .arg(format!("-arch={arch}"))
        .args(["-O3", "--std=c++17", "-o"])
        .arg(&ptx)
        .arg(cu)
        .output();
    let output = match result {
        Ok(o) => o,
        Err(e) => {
            println!(
                "cargo:warning=could not run {} ({e}); the kernels will be compiled by NVRTC at first use",
                nvcc.display()
            );
            return None;
        }
    };
    let log = String::from_utf8_lossy(&output.stderr).into_owned() + &String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !ptx.is_file() {
        println!(
            "cargo:warning=nvcc ({}) failed to compile the kernels for {arch}; they will be compiled by NVRTC at first use:",
            nvcc.display()
        );
        for line in log.lines().filter(|l| !l.trim().is_empty()).take(40) {
            println!("cargo:warning=  {line}");
        }
        return None;
    }
    for line in log.lines().filter(|l| l.contains("warning")) {
        println!("cargo:warning=nvcc: {line}");
    }
    Some(ptx)
}

/// The nvcc to use, if any.
fn find_nvcc() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("NVCC").filter(|v| !v.is_empty()) {
        if v == "none" || v == "0" {
            return None;
        }
        let p = PathBuf::from(&v);
        if p.is_file() {
            return Some(p);
        }
        if let Some(p) = search_path(&p) {
            return Some(p);
        }
        println!(
            "cargo:warning=NVCC={} does not exist; the kernels will be compiled by NVRTC at first use",
            p.display()
        );
        return None;
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let p = Path::new(&home).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    search_path(Path::new("nvcc")).or_else(|| {
        let p = PathBuf::from("/usr/local/cuda/bin/nvcc");
        p.is_file().then_some(p)
    })
}

/// `name` in a directory of `PATH`, when it is a bare name.
fn search_path(name: &Path) -> Option<PathBuf> {
    if name.components().count() != 1 {
        return None;
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// `compute_XY[a]` from `sm_XY`, `compute_XY` or `XY`.
fn parse_arch(s: &str) -> Option<String> {
    let s = s.trim();
    let digits = s.strip_prefix("sm_").or_else(|| s.strip_prefix("compute_")).unwrap_or(s);
    let num = digits.strip_suffix(['a', 'f']).unwrap_or(digits);
    (!num.is_empty() && num.len() <= 3 && num.bytes().all(|b| b.is_ascii_digit())).then(|| format!("compute_{digits}"))
}

/// The oldest virtual architecture from 7.0 up that `nvcc` supports (7.5 for CUDA 13).
fn default_arch(nvcc: &Path) -> String {
    let listed = Command::new(nvcc).arg("--list-gpu-arch").output().ok().filter(|o| o.status.success());
    let oldest = listed.and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("compute_")?.parse::<u32>().ok())
            .filter(|&n| n >= 70)
            .min()
    });
    format!("compute_{}", oldest.unwrap_or(75))
}
