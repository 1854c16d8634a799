//! Enums with one name per value: what the command line, the files and the reports call them.

use crate::{Error, Result};

/// An enum whose values have names.
pub trait Named: Copy + PartialEq + 'static {
    /// What its values are, in errors (`memory mode`).
    const WHAT: &'static str;
    /// Every value, in the order errors list their names.
    const VALUES: &'static [Self];
    /// Whether names are read ignoring case, `-` and `_` (`CIFAR-100` for `cifar100`).
    const LOOSE: bool = false;

    /// The value's name.
    fn name(self) -> &'static str;

    /// The value named `s`; an error listing the names otherwise.
    fn from_name(s: &str) -> Result<Self> {
        let key = |s: &str| if Self::LOOSE { s.to_ascii_lowercase().replace(['-', '_'], "") } else { s.to_string() };
        Self::VALUES.iter().copied().find(|v| key(v.name()) == key(s)).ok_or_else(|| {
            let names: Vec<&str> = Self::VALUES.iter().map(|v| v.name()).collect();
            Error(format!("unknown {} '{s}' ({})", Self::WHAT, names.join(", ")))
        })
    }
}

/// Implements `FromStr` and `Display` for a [`Named`] type (and with `serde`, `Serialize` and
/// `Deserialize`): its names, read and written.
macro_rules! by_name {
    ($t:ty) => {
        impl std::str::FromStr for $t {
            type Err = $crate::Error;
            fn from_str(s: &str) -> $crate::Result<$t> {
                <$t as $crate::named::Named>::from_name(s)
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($crate::named::Named::name(*self))
            }
        }
    };
    ($t:ty, serde) => {
        $crate::named::by_name!($t);

        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str($crate::named::Named::name(*self))
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<$t, D::Error> {
                let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                <$t as $crate::named::Named>::from_name(&name).map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use by_name;

#[cfg(test)]
mod tests {
    use super::Named;
    use crate::config::{Arch, Precision};
    use crate::data::cifar::Dataset;
    use crate::model::names::Naming;
    use crate::model::plan::Mode;

    /// Every value has a name that reads back as it (spelled loosely where the type says so);
    /// anything else is an error listing the names.
    fn reads_back<T: Named + std::fmt::Debug>(every: &[T], loose: &[(&str, T)]) {
        assert_eq!(T::VALUES, every, "{}: VALUES lists every value", T::WHAT);
        for &v in every {
            assert_eq!(T::from_name(v.name()).unwrap(), v);
        }
        for &(s, v) in loose {
            assert_eq!(T::from_name(s).ok(), T::LOOSE.then_some(v), "{s:?}");
        }
        let e = T::from_name("lots").unwrap_err().0;
        assert!(e.starts_with(&format!("unknown {} 'lots' (", T::WHAT)), "{e}");
    }

    #[test]
    fn names_read_back() {
        reads_back(&Mode::ALL, &[("NAIVE", Mode::Naive), ("min_imal", Mode::Minimal)]);
        reads_back(
            &[Dataset::Cifar10, Dataset::Cifar100],
            &[("CIFAR-100", Dataset::Cifar100), ("Cifar_10", Dataset::Cifar10)],
        );
        reads_back(
            &[Arch::Densenet121, Arch::Densenet169, Arch::Densenet201, Arch::Densenet161, Arch::Densenet264],
            &[("DenseNet-169", Arch::Densenet169), ("densenet_264", Arch::Densenet264)],
        );
        reads_back(&Precision::ALL, &[("BF16", Precision::Bf16)]);
        let namings = [Naming::Densenet, Naming::Torchvision, Naming::TorchvisionLegacy];
        reads_back(&namings, &[("Torchvision", Naming::Torchvision)]);
        assert_eq!(Mode::from_name("lots").unwrap_err().0, "unknown memory mode 'lots' (naive, shared, minimal)");
    }
}
