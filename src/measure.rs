//! Measuring what a process uses: a counting allocator for the heap, the peak resident set
//! size, and byte counts as people write them (printed and parsed). The library only provides these; a binary that
//! wants heap figures installs [`Counting`] as its `#[global_allocator]`.

use crate::{bail, Error, Result};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Bytes in a mebibyte (2^20).
pub const MIB: usize = 1 << 20;
/// Bytes in a kibibyte (2^10).
pub const KIB: usize = 1 << 10;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting the bytes in use, their peak and the allocation calls (a few
/// relaxed atomic operations per call; a training step makes next to none).
pub struct Counting;

fn grow(bytes: usize) {
    CALLS.fetch_add(1, Relaxed);
    let now = CURRENT.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(now, Relaxed);
}

fn shrink(bytes: usize) {
    CURRENT.fetch_sub(bytes, Relaxed);
}

// SAFETY: every call goes to the system allocator unchanged, with the caller's arguments (which
// meet `GlobalAlloc`'s contract because the caller's must); only successful calls are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received (see the impl).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received (see the impl).
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received: `p` came from this allocator, so from `System`.
        unsafe { System.dealloc(p, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        // SAFETY: forwarded as received: `p` came from this allocator, so from `System`.
        let q = unsafe { System.realloc(p, layout, size) };
        if !q.is_null() {
            if size > layout.size() {
                grow(size - layout.size());
            } else {
                shrink(layout.size() - size);
            }
        }
        q
    }
}

/// Heap use as counted by [`Counting`] (all zero unless it is the global allocator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heap {
    /// Bytes in use.
    pub current: usize,
    /// Allocation calls so far (allocations and growing reallocations).
    pub calls: usize,
}

impl Heap {
    /// Starts a measurement: the peak restarts from the bytes in use now.
    pub fn start() -> Heap {
        let current = CURRENT.load(Relaxed);
        PEAK.store(current, Relaxed);
        Heap { current, calls: CALLS.load(Relaxed) }
    }

    /// What the heap did since this measurement started.
    pub fn since(&self) -> Growth {
        Growth { peak: PEAK.load(Relaxed).saturating_sub(self.current), calls: CALLS.load(Relaxed) - self.calls }
    }
}

/// The heap's growth over a measurement ([`Heap::since`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Growth {
    /// The most bytes in use at once above what was in use at the start.
    pub peak: usize,
    /// Allocation calls.
    pub calls: usize,
}

/// This process's peak resident set size in bytes (`VmHWM` in `/proc/self/status`), where the
/// system tells it.
pub fn peak_rss() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().strip_suffix("kB")?;
    kib.trim().parse::<usize>().ok().map(|k| k * KIB)
}

/// `bytes` in MiB.
pub fn mib(bytes: usize) -> f64 {
    bytes as f64 / MIB as f64
}

/// A byte count for people: `1023 B`, `1.5 KiB`, `162.2 MiB`.
pub fn human(bytes: usize) -> String {
    match bytes {
        b if b < KIB => format!("{b} B"),
        b if b < MIB => format!("{:.1} KiB", b as f64 / KIB as f64),
        b => format!("{:.1} MiB", mib(b)),
    }
}

/// A size in bytes as people write it: a whole or decimal number and an optional unit,
/// case-insensitive: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024),
/// such as `4GiB`, `512MB`, `1.5GB`; a whole number of bytes, at least 1.
pub fn parse_size(s: &str) -> Result<u64> {
    let expected = || Error("expected a size such as 4GiB, 512MB, 1.5GB or 1000000 (bytes)".into());
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let unit: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(expected()),
    };
    let number = number.trim_end();
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.len() + frac.len() == 0 || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(expected());
    }
    // Exact decimal arithmetic: the digits times the unit over 10^decimals.
    let frac = frac.trim_end_matches('0');
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let too_large = || Error(format!("'{s}' is too large"));
    let scale = u32::try_from(frac.len()).ok().and_then(|d| 10u128.checked_pow(d)).ok_or_else(too_large)?;
    let value = if digits.is_empty() { Ok(0) } else { digits.parse::<u128>() };
    let total = value.ok().and_then(|d| d.checked_mul(unit)).ok_or_else(too_large)?;
    if total % scale != 0 {
        bail!("'{s}' is not a whole number of bytes");
    }
    match u64::try_from(total / scale) {
        Ok(0) => bail!("'{s}' is less than one byte"),
        Ok(b) => Ok(b),
        Err(_) => Err(too_large()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_for_people() {
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(170_052_171), "162.2 MiB");
        assert_eq!(mib(3 << 19), 1.5);
    }

    #[test]
    fn peak_rss_is_read_where_the_system_has_it() {
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(peak_rss().is_some_and(|b| b > 0));
        }
    }

    #[test]
    fn sizes_in_every_unit() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size(" 512 mb ").unwrap(), 512_000_000);
        assert_eq!(parse_size("1000000").unwrap(), 1_000_000);
        assert!(parse_size("0.5B").unwrap_err().0.contains("not a whole number of bytes"));
        assert!(parse_size("0").unwrap_err().0.contains("less than one byte"));
        assert!(parse_size("99999999999TiB").unwrap_err().0.contains("too large"));
        assert!(parse_size("4 GiBs").is_err() && parse_size("-1").is_err() && parse_size(".").is_err());
    }

    /// Fuzzing the size parser with strings drawn from its own alphabet (digits, dots, spaces,
    /// unit letters, signs) and a few others, a fixed seeded budget: no panic, every rejection
    /// one line, and what it accepts is at least one byte.
    #[test]
    fn fuzzed_sizes_never_panic() {
        const CASES: u64 = 50_000;
        let alphabet: Vec<char> = "0123456789.  kKmMgGtTiIbB-+eE_x\u{e9}".chars().collect();
        let mut accepted = 0;
        for case in 0..CASES {
            let r = |k: u64| crate::rng::derive(crate::rng::derive(0x517e, case), k);
            let len = r(0) % 12;
            let s: String = (0..len).map(|k| alphabet[(r(1 + k) % alphabet.len() as u64) as usize]).collect();
            match std::panic::catch_unwind(|| parse_size(&s)) {
                Err(_) => panic!("{s:?} panicked"),
                Ok(Ok(bytes)) => {
                    accepted += 1;
                    assert!(bytes >= 1, "{s:?}");
                }
                Ok(Err(e)) => assert!(!e.0.contains('\n') && !e.0.is_empty(), "{s:?}: {e}"),
            }
        }
        crate::testing::Tally { parser: "`--budget` sizes", cases: CASES, counts: vec![accepted] }.check();
    }
}
