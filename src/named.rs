//! Enums with one name per value: what the command line, the files and the reports call them,
//! read back case-insensitively, ignoring `-` and `_` (`CIFAR-100` is `cifar100`).

use crate::{Error, Result};

/// An enum whose values have names.
pub trait Named: Copy + PartialEq + 'static {
    /// What its values are, in errors (`memory mode`).
    const WHAT: &'static str;
    /// Every value with its name, in the order errors list them.
    const NAMES: &'static [(Self, &'static str)];

    /// The value's name.
    fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(v, _)| *v == self).map(|(_, n)| *n).expect("every value has a name")
    }

    /// The value named `s`; an error listing the names otherwise.
    fn from_name(s: &str) -> Result<Self> {
        let key = |s: &str| s.to_ascii_lowercase().replace(['-', '_'], "");
        Self::NAMES.iter().find(|(_, n)| key(n) == key(s)).map(|(v, _)| *v).ok_or_else(|| {
            let names: Vec<&str> = Self::NAMES.iter().map(|(_, n)| *n).collect();
            Error(format!("unknown {} '{s}' ({})", Self::WHAT, names.join(", ")))
        })
    }
}

/// Implements `FromStr` and `Display` for a [`Named`] type: its names, read and written.
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
}
pub(crate) use by_name;

#[cfg(test)]
mod tests {
    use super::Named;
    use crate::model::plan::Mode;

    #[test]
    fn names_read_back_in_any_case_with_or_without_dashes() {
        for &(mode, name) in Mode::NAMES {
            assert_eq!(mode.name(), name);
            assert_eq!(Mode::from_name(&name.to_uppercase()).unwrap(), mode);
        }
        assert_eq!(Mode::from_name("min_imal").unwrap(), Mode::Minimal);
        assert_eq!(Mode::from_name("lots").unwrap_err().0, "unknown memory mode 'lots' (naive, shared, minimal)");
    }
}
