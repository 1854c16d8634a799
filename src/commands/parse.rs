//! The value parsers of the flags: each turns one argument into a value or a one-line reason
//! that clap prints after the flag's name (sizes such as `--budget 4GiB`:
//! [`densenet::measure::parse_size`]).

use super::device::Device;
use densenet::named::Named;
use densenet::train::recipe::{self, MAX_BATCH, MAX_EPOCHS};
use densenet::{bail, Error, Result};

/// Largest `bench --steps` and `--warmup`.
const MAX_STEPS: usize = 1_000_000;

/// A whole number from `min` to `max`.
pub(crate) fn whole(s: &str, min: usize, max: usize) -> Result<usize> {
    match s.parse() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => bail!("must be a whole number from {min} to {max}"),
    }
}

/// A whole number >= 1.
pub(crate) fn positive(s: &str) -> Result<usize> {
    whole(s, 1, usize::MAX).map_err(|_| Error("must be a whole number >= 1".into()))
}

/// `--epochs`.
pub(crate) fn epochs(s: &str) -> Result<usize> {
    whole(s, 1, MAX_EPOCHS)
}

/// `-b`, `--batch-size`.
pub(crate) fn batch_size(s: &str) -> Result<usize> {
    whole(s, 1, MAX_BATCH)
}

/// `bench --steps`.
pub(crate) fn steps(s: &str) -> Result<usize> {
    whole(s, 1, MAX_STEPS)
}

/// `bench --warmup`.
pub(crate) fn warmup(s: &str) -> Result<usize> {
    whole(s, 0, MAX_STEPS)
}

/// A finite number >= 0.
pub(crate) fn non_negative<T: std::str::FromStr + Into<f64> + Copy>(s: &str) -> Result<T> {
    let Ok(v) = s.parse::<T>() else { bail!("must be a number") };
    let x: f64 = v.into();
    if !(x.is_finite() && x >= 0.0) {
        bail!("must be a finite number >= 0");
    }
    Ok(v)
}

/// `--momentum`: a number in [0, 1).
pub(crate) fn momentum(s: &str) -> Result<f32> {
    match non_negative::<f32>(s) {
        Ok(m) if m < 1.0 => Ok(m),
        _ => bail!("must be a number in [0, 1)"),
    }
}

/// `--name`: one folder under the runs directory.
pub(crate) fn run_name(s: &str) -> Result<String> {
    recipe::check_name(s).map(|()| s.to_string())
}

/// The values of a named enum that a flag asks for (`memory --memory`, `--precision`).
#[derive(Clone, Debug)]
pub(crate) struct OneOrAll<T>(pub(crate) Vec<T>);

/// One value by name, or `all` of them.
pub(crate) fn one_or_all<T: Named>(s: &str) -> Result<OneOrAll<T>> {
    if s == "all" {
        return Ok(OneOrAll(T::VALUES.to_vec()));
    }
    T::from_name(s).map(|v| OneOrAll(vec![v])).map_err(|_| {
        let names: Vec<&str> = T::VALUES.iter().map(|v| v.name()).collect();
        Error(format!("expected {} or all", names.join(", ")))
    })
}

/// `--device`.
pub(crate) fn device(s: &str) -> Result<Device> {
    match s {
        "auto" => Ok(Device::Auto),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        "host" => Ok(Device::Host),
        _ => match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => bail!("expected auto, cpu, cuda, cuda:N or host"),
        },
    }
}
