//! The three namings of a network's tensors: ours (the reference PyTorch CIFAR script's
//! state-dict names, which [`super::net::Net`] gives), torchvision's DenseNet state-dict names,
//! and the legacy spelling of torchvision's downloadable `.pth` files.
//!
//! | ours | torchvision | torchvision-legacy |
//! |---|---|---|
//! | `conv1` (stem) | `features.conv0` | the same |
//! | `bn0` | `features.norm0` | the same |
//! | `block{b}.layer.{i}.bn1`, `.conv1`, `.bn2`, `.conv2` | `features.denseblock{b}.denselayer{i+1}.norm1`, `.conv1`, `.norm2`, `.conv2` | `features.denseblock{b}.denselayer{i+1}.norm.1`, `.conv.1`, `.norm.2`, `.conv.2` |
//! | `trans{t}.bn1`, `.conv1` | `features.transition{t}.norm`, `.conv` | the same |
//! | `bn1` (head) | `features.norm5` | the same |
//! | `fc` | `classifier` | the same |
//!
//! Each module name is followed by `.weight`, `.bias`, `.running_mean`, `.running_var` or
//! `.num_batches_tracked`, unchanged. Legacy files predate `num_batches_tracked` (torchvision's
//! loader renames only weights and statistics), so that naming has none.
//!
//! torchvision builds one layout, the ImageNet stem with bottleneck layers; it has no CIFAR
//! stem, so its namings name only such networks ([`Naming::check`]).

use crate::config::{NetConfig, Stem};
use crate::named::{by_name, Named};
use crate::{bail, Error, Result};

/// How a file names a network's tensors (`densenet`, `torchvision`, `torchvision-legacy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// Ours: the reference PyTorch script's state-dict names (`block1.layer.0.bn1.weight`).
    Densenet,
    /// torchvision's DenseNet state-dict names (`features.denseblock1.denselayer1.norm1.weight`).
    Torchvision,
    /// The spelling of torchvision's downloadable `.pth` files
    /// (`features.denseblock1.denselayer1.norm.1.weight`).
    TorchvisionLegacy,
}

impl Named for Naming {
    const WHAT: &'static str = "naming";
    const VALUES: &'static [Naming] = &[Naming::Densenet, Naming::Torchvision, Naming::TorchvisionLegacy];

    fn name(self) -> &'static str {
        match self {
            Naming::Densenet => "densenet",
            Naming::Torchvision => "torchvision",
            Naming::TorchvisionLegacy => "torchvision-legacy",
        }
    }
}

by_name!(Naming);

impl Naming {
    /// Whether this naming names the network `cfg`: torchvision's only name the ImageNet stem
    /// with bottleneck layers; an error saying why not otherwise.
    pub fn check(self, cfg: &NetConfig) -> Result<()> {
        if self == Naming::Densenet {
            return Ok(());
        }
        let why = match (cfg.stem, cfg.bottleneck) {
            (Stem::ImageNet, true) => return Ok(()),
            (Stem::Cifar, _) => "a CIFAR stem (torchvision has none)",
            (Stem::ImageNet, false) => "basic layers (torchvision's are bottleneck layers)",
        };
        bail!("{self} names fit only ImageNet-stem DenseNets with bottleneck layers; {} has {why}", cfg.name())
    }

    /// Whether files in this naming hold the BN step counters (`num_batches_tracked`).
    pub fn counters(self) -> bool {
        self != Naming::TorchvisionLegacy
    }

    /// The name in this naming of our tensor `ours` (a layout name, or a BN's name ending in
    /// `.num_batches_tracked`); an error for a name that no layout gives.
    pub fn name_of(self, ours: &str) -> Result<String> {
        let unknown = || Error(format!("tensor '{ours}' has no {self} name"));
        if self == Naming::Densenet {
            return Ok(ours.to_string());
        }
        let (module, leaf) = ours.rsplit_once('.').ok_or_else(unknown)?;
        let number = |s: &str, prefix: &str| s.strip_prefix(prefix).and_then(|n| n.parse::<usize>().ok());
        let parts: Vec<&str> = module.split('.').collect();
        let module = match parts[..] {
            ["conv1"] => "features.conv0".to_string(),
            ["bn0"] => "features.norm0".to_string(),
            ["bn1"] => "features.norm5".to_string(),
            ["fc"] => "classifier".to_string(),
            [block, "layer", i, part] => {
                let (Some(b), Ok(i)) = (number(block, "block"), i.parse::<usize>()) else { return Err(unknown()) };
                let part = match (self, part) {
                    (Naming::TorchvisionLegacy, "bn1") => "norm.1",
                    (Naming::TorchvisionLegacy, "conv1") => "conv.1",
                    (Naming::TorchvisionLegacy, "bn2") => "norm.2",
                    (Naming::TorchvisionLegacy, "conv2") => "conv.2",
                    (_, "bn1") => "norm1",
                    (_, "bn2") => "norm2",
                    (_, "conv1" | "conv2") => part,
                    _ => return Err(unknown()),
                };
                format!("features.denseblock{b}.denselayer{}.{part}", i + 1)
            }
            [trans, part] => {
                let Some(t) = number(trans, "trans") else { return Err(unknown()) };
                let part = match part {
                    "bn1" => "norm",
                    "conv1" => "conv",
                    _ => return Err(unknown()),
                };
                format!("features.transition{t}.{part}")
            }
            _ => return Err(unknown()),
        };
        Ok(format!("{module}.{leaf}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::net::Net;
    use std::collections::HashSet;

    /// Every name of a network: parameters, statistics and the BN counters.
    fn every_name(cfg: &NetConfig) -> Vec<String> {
        let lay = Net::new(cfg).layout;
        let mut names: Vec<String> = lay.params.iter().chain(&lay.running).map(|t| t.name.clone()).collect();
        let bns: Vec<String> =
            lay.running.iter().filter_map(|t| t.name.strip_suffix(".running_mean")).map(String::from).collect();
        names.extend(bns.iter().map(|bn| format!("{bn}.num_batches_tracked")));
        names
    }

    /// torchvision's `_load_state_dict` renaming of a legacy name:
    /// `^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$`
    /// becomes group 1 followed by group 2.
    fn torchvision_loader(name: &str) -> String {
        for part in ["norm", "relu", "conv"] {
            for k in ["1", "2"] {
                for leaf in ["weight", "bias", "running_mean", "running_var"] {
                    let tail = format!(".{part}.{k}.{leaf}");
                    if let Some(head) = name.strip_suffix(&tail) {
                        let layer = head.rsplit('.').next().unwrap_or_default();
                        if layer.strip_prefix("denselayer").is_some_and(|d| d.parse::<u32>().is_ok()) {
                            return format!("{head}.{part}{k}.{leaf}");
                        }
                    }
                }
            }
        }
        name.to_string()
    }

    #[test]
    fn each_naming_is_a_bijection_over_the_presets() {
        for preset in ["densenet121", "densenet161", "densenet169"] {
            let cfg = NetConfig::imagenet(preset).unwrap();
            let ours = every_name(&cfg);
            for naming in [Naming::Torchvision, Naming::TorchvisionLegacy] {
                let theirs: Vec<String> = ours.iter().map(|n| naming.name_of(n).unwrap()).collect();
                let distinct: HashSet<&String> = theirs.iter().collect();
                assert_eq!(distinct.len(), ours.len(), "{preset} {naming}: two tensors share a name");
                assert!(theirs.iter().all(|n| n.starts_with("features.") || n.starts_with("classifier.")));
            }
        }
    }

    #[test]
    fn names_follow_the_table() {
        let cases = [
            ("conv1.weight", "features.conv0.weight", "features.conv0.weight"),
            ("bn0.running_var", "features.norm0.running_var", "features.norm0.running_var"),
            (
                "block1.layer.0.bn1.weight",
                "features.denseblock1.denselayer1.norm1.weight",
                "features.denseblock1.denselayer1.norm.1.weight",
            ),
            (
                "block3.layer.11.conv1.weight",
                "features.denseblock3.denselayer12.conv1.weight",
                "features.denseblock3.denselayer12.conv.1.weight",
            ),
            (
                "block4.layer.15.bn2.running_mean",
                "features.denseblock4.denselayer16.norm2.running_mean",
                "features.denseblock4.denselayer16.norm.2.running_mean",
            ),
            (
                "block2.layer.3.conv2.weight",
                "features.denseblock2.denselayer4.conv2.weight",
                "features.denseblock2.denselayer4.conv.2.weight",
            ),
            ("trans2.bn1.bias", "features.transition2.norm.bias", "features.transition2.norm.bias"),
            ("trans3.conv1.weight", "features.transition3.conv.weight", "features.transition3.conv.weight"),
            ("bn1.num_batches_tracked", "features.norm5.num_batches_tracked", "features.norm5.num_batches_tracked"),
            ("fc.bias", "classifier.bias", "classifier.bias"),
        ];
        for (ours, tv, legacy) in cases {
            assert_eq!(Naming::Densenet.name_of(ours).unwrap(), ours);
            assert_eq!(Naming::Torchvision.name_of(ours).unwrap(), tv);
            assert_eq!(Naming::TorchvisionLegacy.name_of(ours).unwrap(), legacy);
        }
        for bad in ["fc", "block1.layer.x.bn1.weight", "trans1.bn2.weight", "head.weight", "blockA.layer.0.bn1.bias"] {
            let e = Naming::Torchvision.name_of(bad).unwrap_err().0;
            assert_eq!(e, format!("tensor '{bad}' has no torchvision name"));
        }
    }

    #[test]
    fn torchvisions_loader_turns_legacy_names_into_torchvision_names() {
        let cfg = NetConfig::imagenet("densenet121").unwrap();
        for ours in every_name(&cfg).iter().filter(|n| !n.ends_with(".num_batches_tracked")) {
            let legacy = Naming::TorchvisionLegacy.name_of(ours).unwrap();
            assert_eq!(torchvision_loader(&legacy), Naming::Torchvision.name_of(ours).unwrap(), "{ours}");
        }
        assert!(!Naming::TorchvisionLegacy.counters() && Naming::Torchvision.counters() && Naming::Densenet.counters());
    }

    #[test]
    fn torchvision_names_fit_its_layout_only() {
        let cifar = NetConfig::cifar(100, 12, true, 0.5, 0.0, 10).unwrap();
        assert!(Naming::Densenet.check(&cifar).is_ok());
        let e = Naming::Torchvision.check(&cifar).unwrap_err().0;
        assert_eq!(
            e,
            "torchvision names fit only ImageNet-stem DenseNets with bottleneck layers; DenseNet-BC-100-12 has a \
             CIFAR stem (torchvision has none)"
        );
        let basic = NetConfig { bottleneck: false, ..NetConfig::imagenet("densenet121").unwrap() };
        assert!(Naming::TorchvisionLegacy.check(&basic).unwrap_err().0.contains("has basic layers"));
        assert!(Naming::Torchvision.check(&NetConfig::imagenet("densenet161").unwrap()).is_ok());
        assert_eq!("torchvision-legacy".parse::<Naming>().unwrap(), Naming::TorchvisionLegacy);
    }
}
