//! Choosing cuDNN's convolution algorithms, apart from the calls into cuDNN so that it is
//! tested without a GPU: which results of cudnnFind count (deterministic, timed with the math
//! that will run, within the workspace cap, each algorithm once), the family switch
//! (`DENSENET_CUDNN_ALGOS`), the order of preference for one geometry, and the record of the
//! rankings that a resumed run reuses instead of timing again.

use std::ffi::c_int;

use cudarc::cudnn::sys as cs;
use serde_json::{json, Value};

use crate::backend::{ConvShape, ConvSpec, DType};
use crate::{bail, Error, Result};

/// Most workspace bytes one convolution algorithm may use.
pub(super) const WORKSPACE_CAP: usize = 256 << 20;
/// Algorithms within this factor of the fastest one's time count as fast.
const NEAR_FASTEST: f32 = 1.10;
/// The version of the record's format.
const RECORD_FORMAT: u64 = 1;
/// The first compute capability major version with TF32 (8.0, Ampere), which cuDNN's default
/// math may use for f32.
const TF32_MAJOR: i32 = 8;

/// A convolution direction; its index into per-direction arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Dir {
    Forward = 0,
    Data = 1,
    Filter = 2,
}

impl std::fmt::Display for Dir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Dir {
    /// Every direction, in index order.
    pub const ALL: [Dir; 3] = [Dir::Forward, Dir::Data, Dir::Filter];

    /// `forward`, `backward-data` or `backward-filter`, as messages and the record name it.
    fn name(self) -> &'static str {
        ["forward", "backward-data", "backward-filter"][self as usize]
    }

    /// Number of algorithms cuDNN has in this direction.
    pub fn algo_count(self) -> u32 {
        match self {
            Dir::Forward => cs::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as u32,
            Dir::Data => cs::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as u32,
            Dir::Filter => cs::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as u32,
        }
    }

    /// Deterministic algorithms tried when none of the ranked ones applies (implicit GEMM first).
    pub fn fallbacks(self) -> &'static [u32] {
        match self {
            Dir::Forward => &[0, 1],
            Dir::Data | Dir::Filter => &[1],
        }
    }

    /// Whether algorithm `algo` is GEMM-based: forward implicit, precomputed-implicit and
    /// explicit GEMM; backward-data algorithms 0 and 1; backward-filter 0, 1 and 3 (the others
    /// are direct, FFT and Winograd).
    fn is_gemm(self, algo: u32) -> bool {
        match self {
            Dir::Forward => algo <= 2,
            Dir::Data => algo <= 1,
            Dir::Filter => matches!(algo, 0 | 1 | 3),
        }
    }
}

/// cudnnConvolution{Fwd,BwdData,BwdFilter}AlgoPerf_t with the enums as plain integers, so a
/// value this cudarc does not know is not undefined behaviour (the three share one layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Perf {
    pub algo: u32,
    pub status: u32,
    pub time: f32,
    pub memory: usize,
    pub determinism: u32,
    pub math: u32,
    pub reserved: [c_int; 3],
}

/// One algorithm as cudnnFind ranked it: time in milliseconds, workspace bytes at the
/// geometry it was timed on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Ranked {
    pub algo: u32,
    pub time: f32,
    pub memory: usize,
}

/// Which cuDNN convolution algorithms may run (`DENSENET_CUDNN_ALGOS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlgorithmFamily {
    /// Every deterministic algorithm (the default; `all`).
    All,
    /// GEMM-based algorithms only (`gemm`): no FFT, Winograd or direct, to tell an algorithm's
    /// rounding from a bug when a step disagrees with the CPU.
    Gemm,
}

impl AlgorithmFamily {
    /// From `DENSENET_CUDNN_ALGOS` (unset or empty: all).
    pub(super) fn from_env() -> Result<AlgorithmFamily> {
        match std::env::var("DENSENET_CUDNN_ALGOS").as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("all") => Ok(AlgorithmFamily::All),
            Ok("gemm") => Ok(AlgorithmFamily::Gemm),
            Ok(other) => bail!("DENSENET_CUDNN_ALGOS={other:?}: expected all or gemm"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            AlgorithmFamily::All => "all",
            AlgorithmFamily::Gemm => "gemm",
        }
    }

    /// Whether `algo` of direction `dir` may run.
    pub(super) fn allows(self, dir: Dir, algo: u32) -> bool {
        algo < dir.algo_count() && (self == AlgorithmFamily::All || dir.is_gemm(algo))
    }
}

/// The math a find result must have been timed with: FMA, which is what runs (the convolution
/// descriptors ask for it), or also cuDNN's default math where that cannot be TF32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Math {
    /// FMA only: on compute capability 8.0 and up the default math of f32 may use TF32.
    Fma,
    /// FMA, and default math as well: the GPU has no TF32 (before 8.0), or
    /// `NVIDIA_TF32_OVERRIDE=0` turns it off.
    FmaOrDefault,
}

impl Math {
    /// The rule for a GPU of compute capability `cc` in this environment.
    pub fn for_gpu(cc: (i32, i32)) -> Math {
        let tf32_off = std::env::var("NVIDIA_TF32_OVERRIDE").is_ok_and(|v| v.trim() == "0");
        if cc.0 < TF32_MAJOR || tf32_off {
            Math::FmaOrDefault
        } else {
            Math::Fma
        }
    }

    fn name(self) -> &'static str {
        match self {
            Math::Fma => "fma",
            Math::FmaOrDefault => "fma or default without tf32",
        }
    }

    fn accepts(self, math: u32) -> bool {
        math == cs::cudnnMathType_t::CUDNN_FMA_MATH as u32
            || (self == Math::FmaOrDefault && math == cs::cudnnMathType_t::CUDNN_DEFAULT_MATH as u32)
    }
}

/// The results of cudnnFind that count, fastest first: succeeded, deterministic, timed with
/// math that will run, allowed by `family`, within [`WORKSPACE_CAP`], each algorithm once (its
/// fastest entry).
pub(super) fn rank(found: &[Perf], dir: Dir, family: AlgorithmFamily, math: Math) -> Vec<Ranked> {
    let mut ok: Vec<Ranked> = found
        .iter()
        .filter(|p| {
            p.status == cs::cudnnStatus_t::CUDNN_STATUS_SUCCESS as u32
                && p.determinism == cs::cudnnDeterminism_t::CUDNN_DETERMINISTIC as u32
                && math.accepts(p.math)
                && family.allows(dir, p.algo)
                && p.memory <= WORKSPACE_CAP
                && p.time.is_finite()
                && p.time >= 0.0
        })
        .map(|p| Ranked { algo: p.algo, time: p.time, memory: p.memory })
        .collect();
    ok.sort_by(|a, b| a.time.total_cmp(&b.time));
    let mut seen = Vec::new();
    ok.retain(|r| {
        let first = !seen.contains(&r.algo);
        seen.push(r.algo);
        first
    });
    ok
}

/// The algorithms that can run one geometry, in order of preference, with the workspace each
/// needs there (`workspace(algo)`: `None` when it does not support the geometry). First the
/// choice: among the ranked algorithms it supports within [`WORKSPACE_CAP`], the one with the
/// smallest workspace among those within [`NEAR_FASTEST`] of the fastest; then the other ranked
/// ones, fastest first; then the fallbacks `family` allows. The choice depends only on the
/// ranking and the geometry, never on how much workspace happens to be free.
pub(super) fn preference(
    ranked: &[Ranked],
    dir: Dir,
    family: AlgorithmFamily,
    mut workspace: impl FnMut(u32) -> Option<usize>,
) -> Vec<(u32, usize, f32)> {
    let mut timed: Vec<(u32, usize, f32)> = ranked
        .iter()
        .filter_map(|r| workspace(r.algo).filter(|&b| b <= WORKSPACE_CAP).map(|b| (r.algo, b, r.time)))
        .collect();
    if let Some(&(_, _, fastest)) = timed.first() {
        let pick = timed
            .iter()
            .enumerate()
            .filter(|(_, t)| t.2 <= fastest * NEAR_FASTEST)
            .min_by_key(|(i, t)| (t.1, *i))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let chosen = timed.remove(pick);
        timed.insert(0, chosen);
    }
    for &a in dir.fallbacks().iter().filter(|&&a| family.allows(dir, a)) {
        if !timed.iter().any(|t| t.0 == a) {
            if let Some(b) = workspace(a).filter(|&b| b <= WORKSPACE_CAP) {
                timed.push((a, b, f32::INFINITY));
            }
        }
    }
    timed
}

/// What a record of rankings is only valid for: the GPU, cuDNN, and the rules of the ranking.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Header {
    /// The GPU's name.
    pub gpu: String,
    /// Its compute capability.
    pub cc: (i32, i32),
    /// cuDNN's version, and the CUDA version it was built for.
    pub cudnn: (usize, usize),
    /// The math the rankings were timed with.
    pub math: Math,
    /// The algorithms allowed.
    pub family: AlgorithmFamily,
}

impl Header {
    fn json(&self) -> Value {
        json!({
            "densenet_cudnn_algorithms": RECORD_FORMAT,
            "gpu": self.gpu,
            "compute_capability": format!("{}.{}", self.cc.0, self.cc.1),
            "cudnn": self.cudnn.0,
            "cudnn_cuda": self.cudnn.1,
            "data_type": "f32",
            "math": self.math.name(),
            "algorithms": self.family.name(),
            "workspace_cap": WORKSPACE_CAP,
        })
    }
}

/// One ranking of a record: a shape timed at a batch on dense tensors, in one direction.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Entry {
    pub shape: ConvShape,
    pub batch: usize,
    pub dir: Dir,
    pub ranked: Vec<Ranked>,
}

/// The record of `entries` under `header`, as the JSON text of the run directory's file.
pub(super) fn record(header: &Header, entries: &[Entry]) -> String {
    let mut doc = header.json();
    let rankings: Vec<Value> = entries
        .iter()
        .map(|e| {
            let s = e.shape;
            let (oh, ow) = (s.spec.out(s.h), s.spec.out(s.w));
            json!({
                "direction": e.dir.name(),
                "k": s.spec.k, "stride": s.spec.stride, "pad": s.spec.pad,
                "cin": s.cin, "cout": s.cout, "h": s.h, "w": s.w, "batch": e.batch,
                "x_image_stride": s.cin * s.h * s.w, "y_image_stride": s.cout * oh * ow,
                "ranked": e.ranked.iter().map(|r| json!({"algo": r.algo, "time_ms": r.time, "memory": r.memory}))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    doc["rankings"] = Value::Array(rankings);
    let mut text = serde_json::to_string_pretty(&doc).expect("a JSON value serializes");
    text.push('\n');
    text
}

/// The entries of a record written by [`record`], if it was made under `header` and every
/// entry is well formed; otherwise why it cannot be used (foreign, stale or corrupt).
pub(super) fn parse_record(text: &str, header: &Header) -> Result<Vec<Entry>> {
    let doc: Value = serde_json::from_str(text).map_err(|e| Error(format!("not a record ({e})")))?;
    let want = header.json();
    for (key, value) in want.as_object().expect("the header is an object") {
        if doc.get(key) != Some(value) {
            bail!(
                "made for {key} {}, this run has {value}",
                doc.get(key).map_or("(none)".to_string(), Value::to_string)
            );
        }
    }
    let Some(rankings) = doc.get("rankings").and_then(Value::as_array) else { bail!("no rankings") };
    rankings
        .iter()
        .enumerate()
        .map(|(i, e)| entry(e, header.family).map_err(|m| Error(format!("ranking {i}: {m}"))))
        .collect()
}

/// Whether `spec` is a convolution of an `h` x `w` input: it has a kernel and a stride, and
/// the kernel fits the padded input.
pub(super) fn is_convolution(spec: ConvSpec, h: usize, w: usize) -> bool {
    spec.k > 0 && spec.stride > 0 && h + 2 * spec.pad >= spec.k && w + 2 * spec.pad >= spec.k
}

/// One entry of a record, checked.
fn entry(e: &Value, family: AlgorithmFamily) -> Result<Entry> {
    let num = |k: &str| e.get(k).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| Error(format!("no {k}")));
    let dir = match e.get("direction").and_then(Value::as_str) {
        Some("forward") => Dir::Forward,
        Some("backward-data") => Dir::Data,
        Some("backward-filter") => Dir::Filter,
        other => bail!("direction {other:?}"),
    };
    let spec = ConvSpec { k: num("k")?, stride: num("stride")?, pad: num("pad")? };
    // The record is of f32 convolutions (the only type the CUDA backend stores).
    let shape = ConvShape { spec, cin: num("cin")?, cout: num("cout")?, h: num("h")?, w: num("w")?, dtype: DType::F32 };
    let batch = num("batch")?;
    if !is_convolution(spec, shape.h, shape.w) || batch == 0 || shape.cin == 0 || shape.cout == 0 {
        bail!("{shape:?} at batch {batch} is not a convolution");
    }
    let dense = (shape.cin * shape.h * shape.w, shape.cout * spec.out(shape.h) * spec.out(shape.w));
    if (num("x_image_stride")?, num("y_image_stride")?) != dense {
        bail!("image strides are not those of dense tensors");
    }
    let Some(list) = e.get("ranked").and_then(Value::as_array) else { bail!("no ranked list") };
    let mut ranked = Vec::new();
    for r in list {
        let missing = |k: &str| Error(format!("no {k}"));
        let algo =
            r.get("algo").and_then(Value::as_u64).filter(|&a| a < u32::MAX as u64).ok_or(missing("algo"))? as u32;
        let time = r.get("time_ms").and_then(Value::as_f64).ok_or(missing("time_ms"))? as f32;
        let memory = r.get("memory").and_then(Value::as_u64).ok_or(missing("memory"))? as usize;
        if !family.allows(dir, algo) || !time.is_finite() || time < 0.0 || memory > WORKSPACE_CAP {
            bail!("algorithm {algo} ({time} ms, {memory} bytes) cannot have been ranked");
        }
        if ranked.iter().any(|p: &Ranked| p.algo == algo || p.time > time) {
            bail!("the ranking repeats an algorithm or is not fastest first");
        }
        ranked.push(Ranked { algo, time, memory });
    }
    Ok(Entry { shape, batch, dir, ranked })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FMA: u32 = cs::cudnnMathType_t::CUDNN_FMA_MATH as u32;
    const DEFAULT: u32 = cs::cudnnMathType_t::CUDNN_DEFAULT_MATH as u32;
    const TENSOR: u32 = cs::cudnnMathType_t::CUDNN_TENSOR_OP_MATH as u32;
    const DET: u32 = cs::cudnnDeterminism_t::CUDNN_DETERMINISTIC as u32;

    fn perf(algo: u32, time: f32, memory: usize, math: u32) -> Perf {
        Perf { algo, time, memory, math, determinism: DET, ..Perf::default() }
    }

    #[test]
    fn ranks_only_what_will_run_once_each() {
        let found = [
            perf(6, 0.5, 1 << 20, DEFAULT), // may be TF32: not what runs
            perf(1, 1.0, 0, FMA),
            perf(7, 0.7, 1 << 10, TENSOR),
            perf(1, 0.9, 0, DEFAULT),
            perf(5, 0.8, 4 << 20, FMA),
            Perf { status: 3, ..perf(2, 0.1, 0, FMA) },
            Perf { determinism: 0, ..perf(3, 0.2, 0, FMA) },
            perf(4, 0.3, WORKSPACE_CAP + 1, FMA),
            perf(5, 1.5, 4 << 20, FMA), // a duplicate, slower
        ];
        let algos = |r: Vec<Ranked>| r.iter().map(|r| r.algo).collect::<Vec<_>>();
        assert_eq!(algos(rank(&found, Dir::Forward, AlgorithmFamily::All, Math::Fma)), [5, 1]);
        // Without TF32, default math is FMA: its entries count too (the fastest of each).
        let r = rank(&found, Dir::Forward, AlgorithmFamily::All, Math::FmaOrDefault);
        assert_eq!(algos(r.clone()), [6, 5, 1]);
        assert_eq!(r[2].time, 0.9);
        assert_eq!(algos(rank(&found, Dir::Forward, AlgorithmFamily::Gemm, Math::FmaOrDefault)), [1]);
    }

    #[test]
    fn the_gemm_family_leaves_out_fft_winograd_and_direct() {
        let allowed =
            |dir: Dir| (0..dir.algo_count()).filter(|&a| AlgorithmFamily::Gemm.allows(dir, a)).collect::<Vec<_>>();
        assert_eq!(allowed(Dir::Forward), [0, 1, 2]);
        assert_eq!(allowed(Dir::Data), [0, 1]);
        assert_eq!(allowed(Dir::Filter), [0, 1, 3]);
        assert!((0..8).all(|a| AlgorithmFamily::All.allows(Dir::Forward, a)));
        assert!(!AlgorithmFamily::All.allows(Dir::Forward, 8));
        assert!(Dir::ALL.iter().all(|&d| d.fallbacks().iter().all(|&a| AlgorithmFamily::Gemm.allows(d, a))));
    }

    #[test]
    fn preference_is_frugal_among_the_fast_and_ignores_free_workspace() {
        let ranked = [
            Ranked { algo: 6, time: 1.0, memory: 8 << 20 },
            Ranked { algo: 1, time: 1.05, memory: 1 << 20 },
            Ranked { algo: 0, time: 2.0, memory: 0 },
        ];
        // The geometry's own workspace sizes decide, not the dense ones the ranking holds.
        let sizes = |a: u32| match a {
            6 => Some(16 << 20),
            1 => Some(2 << 20),
            0 => Some(0),
            _ => None,
        };
        assert_eq!(
            preference(&ranked, Dir::Forward, AlgorithmFamily::All, sizes),
            [(1, 2 << 20, 1.05), (6, 16 << 20, 1.0), (0, 0, 2.0)]
        );
        // Algorithm 1 does not support this geometry: 6 is the fastest supported, and frugal.
        let no_1 = |a: u32| if a == 1 { None } else { sizes(a) };
        let p = preference(&ranked, Dir::Forward, AlgorithmFamily::All, no_1);
        assert_eq!(p[0].0, 6);
        assert_eq!(p.iter().map(|t| t.0).collect::<Vec<_>>(), [6, 0]);
        // No ranking: the fallbacks, implicit GEMM first.
        let p = preference(&[], Dir::Forward, AlgorithmFamily::All, |_| Some(64));
        assert_eq!(p, [(0, 64, f32::INFINITY), (1, 64, f32::INFINITY)]);
    }

    fn header() -> Header {
        Header {
            gpu: "NVIDIA H200".into(),
            cc: (9, 0),
            cudnn: (91300, 13000),
            math: Math::Fma,
            family: AlgorithmFamily::All,
        }
    }

    fn entries() -> Vec<Entry> {
        let shape = ConvShape { spec: ConvSpec::SAME3, cin: 24, cout: 12, h: 32, w: 32, dtype: DType::F32 };
        let ranked = vec![Ranked { algo: 1, time: 0.25, memory: 0 }, Ranked { algo: 6, time: 0.5, memory: 4096 }];
        vec![
            Entry { shape, batch: 64, dir: Dir::Forward, ranked: ranked.clone() },
            Entry { shape, batch: 64, dir: Dir::Filter, ranked: vec![] },
            Entry {
                shape: ConvShape { spec: ConvSpec::POINTWISE, ..shape },
                batch: 64,
                dir: Dir::Data,
                ranked: vec![Ranked { algo: 5, time: 0.75, memory: 1 << 20 }],
            },
        ]
    }

    #[test]
    fn a_record_reads_back_exactly() {
        let text = record(&header(), &entries());
        assert_eq!(parse_record(&text, &header()).unwrap(), entries());
    }

    /// Structure-aware fuzzing of the record reader: every number and string of a valid record
    /// replaced by hostile values, truncation, bytes flipped; a fixed seeded budget. No panic;
    /// a record either reads back as well-formed entries or is refused with one line; how many
    /// got past the first check (JSON that parses) is the README's count.
    #[test]
    fn fuzzed_records_are_refused_in_one_line_never_panics() {
        const CASES: u64 = 20_000;
        let text = record(&header(), &entries());
        let spans = crate::testing::json_spans(&text);
        let values = ["0", "-1", "4294967295", "18446744073709551615", "1e308", "-0.5", "NaN", "", "\"x\"", "[]", "{}"];
        let mut past_first = 0;
        for case in 0..CASES {
            let r = |k: u64| crate::rng::derive(crate::rng::derive(0x5eed, case), k);
            let mutated = match r(0) % 3 {
                0 => {
                    let (a, b) = spans[(r(1) % spans.len() as u64) as usize];
                    let mut t = text.clone();
                    t.replace_range(a..b, values[(r(2) % values.len() as u64) as usize]);
                    t
                }
                1 => text[..(r(3) % text.len() as u64) as usize].to_string(),
                _ => {
                    let mut b = text.clone().into_bytes();
                    let at = (r(4) % b.len() as u64) as usize;
                    b[at] ^= 1 << (r(5) % 7);
                    String::from_utf8_lossy(&b).into_owned()
                }
            };
            match std::panic::catch_unwind(|| parse_record(&mutated, &header())) {
                Err(_) => panic!("case {case} panicked"),
                Ok(Ok(entries)) => {
                    past_first += 1;
                    for e in entries {
                        assert!(e.ranked.iter().all(|r| AlgorithmFamily::All.allows(e.dir, r.algo)), "case {case}");
                    }
                }
                Ok(Err(e)) => {
                    assert!(!e.0.contains('\n'), "case {case}: {e}");
                    if !e.0.starts_with("not a record") {
                        past_first += 1;
                    }
                }
            }
        }
        crate::testing::Tally { parser: "cuDNN algorithm record", cases: CASES, counts: vec![past_first] }.check();
    }

    #[test]
    fn a_foreign_stale_or_corrupt_record_is_refused() {
        let text = record(&header(), &entries());
        for other in [
            Header { gpu: "NVIDIA H100 80GB HBM3".into(), ..header() },
            Header { cc: (8, 0), ..header() },
            Header { cudnn: (91400, 13000), ..header() },
            Header { cudnn: (91300, 12090), ..header() },
            Header { math: Math::FmaOrDefault, ..header() },
            Header { family: AlgorithmFamily::Gemm, ..header() },
        ] {
            let e = parse_record(&text, &other).unwrap_err().to_string();
            assert!(e.starts_with("made for "), "{other:?}: {e}");
        }
        let bad = |from: &str, to: &str| {
            assert!(text.contains(from), "{from}");
            parse_record(&text.replacen(from, to, 1), &header()).unwrap_err().to_string()
        };
        assert!(bad("\"algo\": 6", "\"algo\": 99").contains("cannot have been ranked"));
        assert!(bad("\"time_ms\": 0.5", "\"time_ms\": 0.125").contains("not fastest first"));
        assert!(bad("\"algo\": 6", "\"algo\": 1").contains("repeats"));
        assert!(bad("\"x_image_stride\": 24576", "\"x_image_stride\": 24577").contains("dense"));
        assert!(bad("\"direction\": \"forward\"", "\"direction\": \"sideways\"").contains("direction"));
        assert!(bad("\"k\": 3", "\"k\": 0").contains("not a convolution"));
        assert!(bad("\"densenet_cudnn_algorithms\": 1", "\"densenet_cudnn_algorithms\": 2").starts_with("made for"));
        assert!(parse_record(&text[..text.len() / 2], &header()).unwrap_err().to_string().starts_with("not a record"));
        assert!(parse_record("", &header()).is_err());
        // A GEMM-only record cannot hold a Winograd algorithm.
        let gemm = Header { family: AlgorithmFamily::Gemm, ..header() };
        let text = record(&gemm, &entries());
        assert!(parse_record(&text, &gemm).unwrap_err().to_string().contains("cannot have been ranked"));
    }
}
