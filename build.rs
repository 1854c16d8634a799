//! Build script: the CUDA kernels in `kernels/`.
//!
//! `kernels/dn.cuh` and `kernels/*.cu` (sorted) are concatenated into one translation unit,
//! `$OUT_DIR/kernels.cu`, which is then
//! - compiled to PTX by nvcc when one is found (`build/nvcc.rs`), else embedded as source for
//!   NVRTC to compile at first use; a build never fails for lack of CUDA;
//! - compiled by the host C++ compiler against `kernels/host/` (`build/host.rs`), so tests run
//!   every kernel on the CPU.
//!
//! `$OUT_DIR/kernels.rs` gives the Rust side the source, the PTX (if any) and the kernel names.

#[path = "build/host.rs"]
mod host;
#[path = "build/nvcc.rs"]
mod nvcc;
#[path = "src/backend/cuda/ptx.rs"]
mod ptx;

use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=kernels");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = concatenate(Path::new("kernels"));
    let names = kernel_names(&source);
    let cu = out.join("kernels.cu");
    fs::write(&cu, &source).expect("write kernels.cu");
    let ptx = nvcc::compile(&cu, &out);
    host::compile(&cu, &names, &out);
    let mut rs = String::from(
        "/// The kernels' CUDA C++ source, one translation unit (NVRTC compiles it when no PTX was built).\n",
    );
    rs += "pub const SOURCE: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/kernels.cu\"));\n";
    rs += "/// PTX compiled by nvcc at build time, if nvcc was found.\n";
    match &ptx {
        Some(p) => rs += &format!("pub const PTX: Option<&str> = Some(include_str!({:?}));\n", p.display().to_string()),
        None => rs += "pub const PTX: Option<&str> = None;\n",
    }
    let build = match &ptx {
        Some(p) => {
            let text = fs::read_to_string(p).expect("read kernels.ptx");
            let target = text.lines().find_map(|l| l.trim().strip_prefix(".target")).unwrap_or("").trim().to_string();
            match ptx::isa(&text) {
                Some(v) => format!("kernels: nvcc's PTX for {target}; {}", ptx::describe(v)),
                None => format!("kernels: nvcc's PTX for {target} (no .version directive)"),
            }
        }
        None => "kernels: built without nvcc; NVRTC compiles them when a GPU opens".to_string(),
    };
    rs += "/// What the kernels were built as, and the driver that PTX needs (for `--version`).\n";
    rs += &format!("pub const BUILD: &str = {build:?};\n");
    let version = format!("{}\n{build}", std::env::var("CARGO_PKG_VERSION").expect("cargo sets the version"));
    rs += "/// `densenet --version`: the package version, then [`BUILD`].\n";
    rs += &format!("pub const VERSION: &str = {version:?};\n");
    rs += "/// Every `__global__` function, in source order.\n";
    rs += &format!("pub const NAMES: &[&str] = &{names:?};\n");
    fs::write(out.join("kernels.rs"), rs).expect("write kernels.rs");
}

/// `dn.cuh` followed by every `kernels/*.cu` in name order, without their `#include "dn.cuh"`.
fn concatenate(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("kernels/ exists")
        .map(|e| e.expect("readable kernels/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    let mut src = fs::read_to_string(dir.join("dn.cuh")).expect("kernels/dn.cuh");
    for f in files {
        src += &format!("\n// ---- {} ----\n", f.display());
        let text = fs::read_to_string(&f).expect("readable kernel source");
        for line in text.lines().filter(|l| l.trim() != "#include \"dn.cuh\"") {
            src += line;
            src.push('\n');
        }
    }
    src
}

/// Names of the kernels in `src`, in order, outside comments and macro definitions: each
/// `__global__ void name(` function, and the three instances `name_f32`, `name_bf16` and
/// `name_f16` of each `DN_STORAGE_KERNELS(name, ...)` (kernels/dn.cuh).
fn kernel_names(src: &str) -> Vec<String> {
    let ident = |rest: &str| {
        let rest = rest.trim_start();
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
        Some(rest[..end].to_string())
    };
    let mut names = Vec::new();
    let mut in_define = false;
    for line in strip_comments(src).lines() {
        let defining = in_define || line.trim_start().starts_with("#define");
        in_define = defining && line.trim_end().ends_with('\\');
        if defining {
            continue;
        }
        if let Some(name) = line.split_once("__global__").and_then(|(_, r)| ident(r.trim_start().strip_prefix("void")?))
        {
            names.push(name);
        } else if let Some(name) = line.split_once("DN_STORAGE_KERNELS(").and_then(|(_, r)| ident(r)) {
            names.extend(["f32", "bf16", "f16"].map(|t| format!("{name}_{t}")));
        }
    }
    names
}

/// `src` without its `//` and `/* */` comments (string literals are not special-cased: kernels
/// have none that contain comment markers).
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find('/') {
        out += &rest[..i];
        let tail = &rest[i..];
        if tail.starts_with("//") {
            rest = tail.find('\n').map_or("", |j| &tail[j..]);
        } else if let Some(body) = tail.strip_prefix("/*") {
            out.push(' ');
            rest = body.find("*/").map_or("", |j| &body[j + 2..]);
        } else {
            out.push('/');
            rest = &tail[1..];
        }
    }
    out + rest
}
