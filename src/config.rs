//! The network description: CIFAR variants (three blocks, 3x3 stem) and the ImageNet presets
//! (four blocks, 7x7 stride-2 stem and max pool), plus the geometry they imply for an input size.

use crate::backend::DType;
use crate::named::{by_name, Named};
use crate::{bail, Result};
use serde::{Deserialize, Serialize};

/// How the image becomes the first dense block's input (`"cifar"` or `"imagenet"` in JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// 3x3 convolution, stride 1, padding 1 (CIFAR).
    Cifar,
    /// 7x7 stride-2 convolution, BN, ReLU, 3x3 stride-2 max pool (ImageNet).
    ImageNet,
}

/// A DenseNet: everything that fixes its parameters and its computation. In JSON (checkpoint
/// metadata), an object of these fields; check a parsed one with [`NetConfig::validate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Stem type.
    pub stem: Stem,
    /// Channels written by the stem into the first block.
    pub stem_channels: usize,
    /// Growth rate k: channels each layer adds.
    pub growth: usize,
    /// Layers per dense block.
    pub block_layers: Vec<usize>,
    /// Bottleneck layers (BN-ReLU-1x1 conv to 4k, then BN-ReLU-3x3 conv) instead of basic ones.
    pub bottleneck: bool,
    /// Transition compression: a transition keeps floor(C * reduction) channels.
    pub reduction: f64,
    /// Dropout probability after every convolution except the stem (0 disables).
    pub drop_rate: f32,
    /// Output classes.
    pub num_classes: usize,
    /// How the large tensors are stored. Absent in JSON when `f32`, as before there was a
    /// choice, so an f32 checkpoint reads in every version.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// How the large tensors are stored (docs/precision.md): the block buffers, their gradients,
/// the tensors a layer uses while it runs, kept activations and the input batch. Parameters,
/// gradients, momentum, statistics, logits and the loss are f32 in every precision, and all
/// arithmetic is f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32: the reference-exact recipe.
    #[default]
    F32,
    /// bfloat16 storage (round to nearest even).
    Bf16,
    /// IEEE half storage, with loss scaling.
    Fp16,
}

impl Named for Precision {
    const WHAT: &'static str = "precision";
    const VALUES: &'static [Precision] = &Precision::ALL;

    fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}
by_name!(Precision, serde);

impl Precision {
    /// Every precision, widest first.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::Fp16];

    /// Whether this is f32, the reference-exact recipe.
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The element type of the large tensors.
    pub fn storage(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Fp16 => DType::F16,
        }
    }
}

/// Largest growth rate accepted (BC-190-40 uses 40).
pub const MAX_GROWTH: usize = 1024;
/// Most dense layers in a network (BC-250 has 123).
pub const MAX_LAYERS: usize = 2000;
/// Most dense blocks in a network (the references have 3 or 4).
pub const MAX_BLOCKS: usize = 8;

/// Classes of ImageNet, the presets' default.
pub const IMAGENET_CLASSES: usize = 1000;

/// An ImageNet architecture of the DenseNet paper, by torchvision's name: four bottleneck
/// blocks with compression 0.5 behind a 7x7 stride-2 stem of 2k channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// DenseNet-121: k = 32, blocks of 6, 12, 24, 16 layers.
    Densenet121,
    /// DenseNet-169: k = 32, blocks of 6, 12, 32, 32 layers.
    Densenet169,
    /// DenseNet-201: k = 32, blocks of 6, 12, 48, 32 layers.
    Densenet201,
    /// DenseNet-161: k = 48, blocks of 6, 12, 36, 24 layers.
    Densenet161,
    /// DenseNet-264: k = 32, blocks of 6, 12, 64, 48 layers (the paper's largest model has k = 48).
    Densenet264,
}

impl Named for Arch {
    const WHAT: &'static str = "architecture";
    const VALUES: &'static [Arch] = &Arch::ALL;
    const LOOSE: bool = true;

    fn name(self) -> &'static str {
        match self {
            Arch::Densenet121 => "densenet121",
            Arch::Densenet169 => "densenet169",
            Arch::Densenet201 => "densenet201",
            Arch::Densenet161 => "densenet161",
            Arch::Densenet264 => "densenet264",
        }
    }
}

by_name!(Arch, serde);

impl Arch {
    /// Every architecture, smallest first as the paper lists them.
    pub const ALL: [Arch; 5] =
        [Arch::Densenet121, Arch::Densenet169, Arch::Densenet201, Arch::Densenet161, Arch::Densenet264];

    /// The preset's growth rate.
    pub fn growth(self) -> usize {
        match self {
            Arch::Densenet161 => 48,
            _ => 32,
        }
    }

    /// Layers per dense block.
    fn block_layers(self) -> [usize; 4] {
        match self {
            Arch::Densenet121 => [6, 12, 24, 16],
            Arch::Densenet169 => [6, 12, 32, 32],
            Arch::Densenet201 => [6, 12, 48, 32],
            Arch::Densenet161 => [6, 12, 36, 24],
            Arch::Densenet264 => [6, 12, 64, 48],
        }
    }

    /// The network with growth rate `growth` (the preset's is [`Arch::growth`]) and a stem of
    /// 2k channels, as the paper builds every ImageNet model.
    pub fn config(self, growth: usize, drop_rate: f32, num_classes: usize) -> Result<NetConfig> {
        let cfg = NetConfig {
            stem: Stem::ImageNet,
            stem_channels: 2 * growth,
            growth,
            block_layers: self.block_layers().to_vec(),
            bottleneck: true,
            reduction: 0.5,
            drop_rate,
            num_classes,
            precision: Precision::F32,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The architecture `cfg` is built as (whatever its growth rate, dropout and classes), if any.
    pub fn of(cfg: &NetConfig) -> Option<Arch> {
        let preset = |a: &Arch| {
            cfg.stem == Stem::ImageNet
                && cfg.block_layers[..] == a.block_layers()[..]
                && cfg.stem_channels == 2 * cfg.growth
                && cfg.bottleneck
                && cfg.reduction == 0.5
        };
        Arch::VALUES.iter().copied().find(preset)
    }
}

impl NetConfig {
    /// The reference CIFAR network `DenseNet3(depth, classes, growth, reduction, bottleneck,
    /// drop)`. The depth must be 3n+4 (basic) or 6n+4 (bottleneck) with n >= 1.
    pub fn cifar(
        depth: usize,
        growth: usize,
        bottleneck: bool,
        reduction: f64,
        drop_rate: f32,
        num_classes: usize,
    ) -> Result<Self> {
        const BLOCKS: usize = 3;
        let (per_layer, fixed) = (weighted_per_layer(bottleneck), weighted_outside_layers(BLOCKS));
        let step = BLOCKS * per_layer;
        let Some(n) = depth.checked_sub(fixed).filter(|d| *d >= step && d.is_multiple_of(step)).map(|d| d / step)
        else {
            bail!(
                "depth {depth} does not fit the variant: it must be {step}n+{fixed} {} (n >= 1)",
                match bottleneck {
                    true => "with bottleneck",
                    false => "without bottleneck",
                }
            );
        };
        let cfg = NetConfig {
            stem: Stem::Cifar,
            stem_channels: 2 * growth,
            growth,
            block_layers: vec![n; BLOCKS],
            bottleneck,
            reduction,
            drop_rate,
            num_classes,
            precision: Precision::F32,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// An ImageNet preset by name ([`Arch`]), with its growth rate, no dropout and 1000 classes.
    pub fn imagenet(name: &str) -> Result<Self> {
        let arch = Arch::from_name(name)?;
        arch.config(arch.growth(), 0.0, IMAGENET_CLASSES)
    }

    /// Checks the values that no constructor can make wrong by itself.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_GROWTH).contains(&self.growth) {
            bail!("growth rate must be from 1 to {MAX_GROWTH}, got {}", self.growth);
        }
        if self.block_layers.is_empty() || self.block_layers.contains(&0) {
            bail!("every dense block needs at least one layer");
        }
        if self.block_layers.len() > MAX_BLOCKS {
            bail!("{} dense blocks is more than the {MAX_BLOCKS} this engine plans for", self.block_layers.len());
        }
        let layers: usize = self.block_layers.iter().fold(0, |a, &n| a.saturating_add(n));
        if layers > MAX_LAYERS {
            bail!("{layers} dense layers is more than the {MAX_LAYERS} this engine plans for");
        }
        if !(1..=MAX_GROWTH * 8).contains(&self.stem_channels) {
            bail!("stem channels must be from 1 to {}, got {}", MAX_GROWTH * 8, self.stem_channels);
        }
        if !(self.reduction > 0.0 && self.reduction <= 1.0) {
            bail!("reduction must be in (0, 1], got {}", self.reduction);
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            bail!("dropout rate must be in [0, 1), got {}", self.drop_rate);
        }
        if self.num_classes == 0 {
            bail!("the number of classes must be at least 1");
        }
        let mut c = self.stem_channels;
        for (b, &n) in self.block_layers.iter().enumerate() {
            c += n * self.growth;
            if b + 1 < self.block_layers.len() {
                c = self.transition_channels(c);
                if c == 0 {
                    bail!("reduction {} leaves transition {} with no channels", self.reduction, b + 1);
                }
            }
        }
        Ok(())
    }

    /// Whether `other` has the same parameters (every tensor's name and shape): it may differ
    /// in its dropout rate and its precision only.
    pub fn same_parameters(&self, other: &NetConfig) -> bool {
        let tensors = |c: &NetConfig| NetConfig { drop_rate: 0.0, precision: Precision::F32, ..c.clone() };
        tensors(self) == tensors(other)
    }

    /// The depth the conventional name gives: weighted layers (two per bottleneck layer), plus
    /// one per transition, the stem and the classifier (3n+4 or 6n+4 for the CIFAR networks).
    pub fn depth(&self) -> usize {
        let layers: usize = self.block_layers.iter().sum();
        layers * weighted_per_layer(self.bottleneck) + weighted_outside_layers(self.block_layers.len())
    }

    /// Output channels of a transition whose input has `c` channels.
    pub fn transition_channels(&self, c: usize) -> usize {
        (c as f64 * self.reduction).floor() as usize
    }

    /// Bottleneck width (channels of the 1x1 convolution's output): 4k.
    pub fn bottleneck_width(&self) -> usize {
        4 * self.growth
    }

    /// Input spatial sizes must be divisible by this.
    pub fn size_divisor(&self) -> usize {
        let transitions = 1 << (self.block_layers.len() - 1);
        match self.stem {
            Stem::Cifar => transitions,
            Stem::ImageNet => 4 * transitions,
        }
    }

    /// The channel and spatial geometry of every block for an `h` x `w` input.
    pub fn geometry(&self, h: usize, w: usize) -> Result<Vec<BlockGeom>> {
        let d = self.size_divisor();
        if h == 0 || w == 0 || !h.is_multiple_of(d) || !w.is_multiple_of(d) {
            bail!("input size {h}x{w} must be a positive multiple of {d} for this network");
        }
        let (mut h, mut w) = match self.stem {
            Stem::Cifar => (h, w),
            Stem::ImageNet => (h / 4, w / 4),
        };
        let mut c0 = self.stem_channels;
        let mut out = Vec::new();
        for &layers in &self.block_layers {
            let c_final = c0 + layers * self.growth;
            out.push(BlockGeom { c0, layers, c_final, h, w });
            c0 = self.transition_channels(c_final);
            h /= 2;
            w /= 2;
        }
        Ok(out)
    }

    /// The conventional name, e.g. `DenseNet-BC-100-12`, `DenseNet-40-12`, `DenseNet-121`.
    pub fn name(&self) -> String {
        if let Some(arch) = Arch::of(self) {
            let number = &arch.name()["densenet".len()..];
            return match self.growth == arch.growth() {
                true => format!("DenseNet-{number}"),
                false => format!("DenseNet-{number} (k={})", self.growth),
            };
        }
        let tag = match (self.bottleneck, self.reduction < 1.0) {
            (true, true) => "BC-",
            (true, false) => "B-",
            (false, true) => "C-",
            (false, false) => "",
        };
        format!("DenseNet-{tag}{}-{}", self.depth(), self.growth)
    }
}

/// Weighted layers of one dense layer: two convolutions with a bottleneck, one without.
fn weighted_per_layer(bottleneck: bool) -> usize {
    if bottleneck {
        2
    } else {
        1
    }
}

/// Weighted layers outside the dense layers of a network of `blocks` blocks: the stem, a
/// transition between two blocks, the classifier.
fn weighted_outside_layers(blocks: usize) -> usize {
    blocks + 1
}

/// One dense block's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockGeom {
    /// Channels entering the block.
    pub c0: usize,
    /// Layers in the block.
    pub layers: usize,
    /// Channels leaving the block: c0 + layers * k.
    pub c_final: usize,
    /// Feature map height.
    pub h: usize,
    /// Feature map width.
    pub w: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The precision is recorded with the network, except f32, which reads from a file that
    /// does not say it (written before there was a choice) and is not written, so that every
    /// version reads an f32 checkpoint.
    #[test]
    fn the_precision_is_recorded_unless_f32() {
        let f32 = NetConfig::cifar(16, 4, true, 0.5, 0.0, 10).unwrap();
        let text = serde_json::to_string(&f32).unwrap();
        assert!(!text.contains("precision"), "{text}");
        assert_eq!(serde_json::from_str::<NetConfig>(&text).unwrap(), f32);
        for precision in [Precision::Bf16, Precision::Fp16] {
            let cfg = NetConfig { precision, ..f32.clone() };
            let text = serde_json::to_string(&cfg).unwrap();
            assert!(text.contains(&format!(r#""precision":"{precision}""#)), "{text}");
            assert_eq!(serde_json::from_str::<NetConfig>(&text).unwrap(), cfg);
        }
        let fp8 = text.replace("}", r#","precision":"fp8"}"#);
        let e = serde_json::from_str::<NetConfig>(&fp8).unwrap_err().to_string();
        assert!(e.contains("unknown precision 'fp8' (f32, bf16, fp16)"), "{e}");
    }

    #[test]
    fn depth_must_fit_variant() {
        assert!(NetConfig::cifar(100, 12, true, 0.5, 0.0, 10).is_ok());
        assert!(NetConfig::cifar(40, 12, false, 1.0, 0.0, 10).is_ok());
        assert!(NetConfig::cifar(43, 12, false, 1.0, 0.0, 10).is_ok());
        let e = NetConfig::cifar(43, 12, true, 0.5, 0.0, 10).unwrap_err();
        assert!(e.0.contains("6n+4"), "{e}");
        assert!(NetConfig::cifar(41, 12, false, 1.0, 0.0, 10).is_err());
        assert!(NetConfig::cifar(4, 12, false, 1.0, 0.0, 10).is_err());
        assert!(NetConfig::cifar(100, 0, true, 0.5, 0.0, 10).is_err());
        assert!(NetConfig::cifar(100, 12, true, 0.0, 0.0, 10).is_err());
        assert!(NetConfig::cifar(100, 12, true, 0.5, 1.0, 10).is_err());
    }

    #[test]
    fn names_and_geometry() {
        let c = NetConfig::cifar(100, 12, true, 0.5, 0.0, 10).unwrap();
        assert_eq!(c.name(), "DenseNet-BC-100-12");
        let g = c.geometry(32, 32).unwrap();
        assert_eq!(g[0], BlockGeom { c0: 24, layers: 16, c_final: 216, h: 32, w: 32 });
        assert_eq!(g[1].c0, 108);
        assert_eq!(g[2], BlockGeom { c0: 150, layers: 16, c_final: 342, h: 8, w: 8 });
        assert!(c.geometry(30, 32).is_err());
        assert_eq!(NetConfig::cifar(40, 12, false, 1.0, 0.0, 10).unwrap().name(), "DenseNet-40-12");
        let i = NetConfig::imagenet("DenseNet-121").unwrap();
        assert_eq!(i.name(), "DenseNet-121");
        assert_eq!(i.geometry(224, 224).unwrap()[0].h, 56);
        assert!(i.geometry(200, 224).is_err());
        assert!(NetConfig::imagenet("densenet99").is_err());
    }

    #[test]
    fn architectures_are_named_and_recognized() {
        for &arch in Arch::VALUES {
            let cfg = arch.config(arch.growth(), 0.1, 10).unwrap();
            assert_eq!(Arch::of(&cfg), Some(arch));
            assert_eq!(cfg.name(), format!("DenseNet-{}", &arch.name()[8..]));
        }
        let big = Arch::Densenet264.config(48, 0.0, 1000).unwrap();
        assert_eq!((big.name(), big.stem_channels), ("DenseNet-264 (k=48)".to_string(), 96));
        assert_eq!(Arch::from_name("DenseNet-121").unwrap(), Arch::Densenet121);
        assert_eq!(Arch::of(&NetConfig::cifar(100, 12, true, 0.5, 0.0, 10).unwrap()), None);
        let wide_stem = NetConfig { stem_channels: 65, ..NetConfig::imagenet("densenet121").unwrap() };
        assert_eq!(Arch::of(&wide_stem), None);
    }
}
