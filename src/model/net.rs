//! The network's structure: every layer's parameters (offsets into the flat buffers) and the
//! channel geometry, built from a [`NetConfig`] under the reference state-dict names.

use super::params::{BnParams, ParamLayout};
use crate::config::{NetConfig, Stem};

/// One dense layer.
#[derive(Clone, Copy, Debug)]
pub struct Layer {
    /// Input channels C_l.
    pub c_in: usize,
    /// BN before the first convolution.
    pub bn1: BnParams,
    /// First convolution: 1x1 to 4k (bottleneck) or 3x3 to k (basic).
    pub conv1: usize,
    /// Bottleneck only: BN and 3x3 convolution to k.
    pub second: Option<(BnParams, usize)>,
}

/// A transition between blocks: BN, ReLU, 1x1 conv, 2x2 average pool.
#[derive(Clone, Copy, Debug)]
pub struct Transition {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// BN.
    pub bn: BnParams,
    /// 1x1 convolution.
    pub conv: usize,
}

/// The whole network's parameter references.
#[derive(Clone, Debug)]
pub struct Net {
    /// Every tensor's name, shape and offset.
    pub layout: ParamLayout,
    /// Stem convolution (3x3 for CIFAR, 7x7 stride 2 for ImageNet).
    pub stem_conv: usize,
    /// ImageNet stem BN.
    pub stem_bn: Option<BnParams>,
    /// Layers of each dense block.
    pub blocks: Vec<Vec<Layer>>,
    /// Transitions after every block but the last.
    pub transitions: Vec<Transition>,
    /// Final BN before pooling.
    pub head_bn: BnParams,
    /// Classifier weight [classes, C].
    pub fc_w: usize,
    /// Classifier bias.
    pub fc_b: usize,
}

impl Net {
    /// Lays out the parameters of `cfg` (which must be valid).
    pub fn new(cfg: &NetConfig) -> Net {
        let mut p = ParamLayout::default();
        let (stem_conv, stem_bn) = match cfg.stem {
            Stem::Cifar => (p.conv("conv1", cfg.stem_channels, 3, 3), None),
            Stem::ImageNet => {
                let conv = p.conv("conv1", cfg.stem_channels, 3, 7);
                (conv, Some(p.bn("bn0", cfg.stem_channels)))
            }
        };
        let (k, width) = (cfg.growth, cfg.bottleneck_width());
        let mut c = cfg.stem_channels;
        let mut blocks = Vec::new();
        let mut transitions = Vec::new();
        for (b, &layers) in cfg.block_layers.iter().enumerate() {
            let mut block = Vec::new();
            for i in 0..layers {
                let pre = format!("block{}.layer.{i}", b + 1);
                let bn1 = p.bn(&format!("{pre}.bn1"), c);
                let layer = if cfg.bottleneck {
                    let conv1 = p.conv(&format!("{pre}.conv1"), width, c, 1);
                    let bn2 = p.bn(&format!("{pre}.bn2"), width);
                    let conv2 = p.conv(&format!("{pre}.conv2"), k, width, 3);
                    Layer { c_in: c, bn1, conv1, second: Some((bn2, conv2)) }
                } else {
                    Layer { c_in: c, bn1, conv1: p.conv(&format!("{pre}.conv1"), k, c, 3), second: None }
                };
                block.push(layer);
                c += k;
            }
            blocks.push(block);
            if b + 1 < cfg.block_layers.len() {
                let pre = format!("trans{}", b + 1);
                let c_out = cfg.transition_channels(c);
                let bn = p.bn(&format!("{pre}.bn1"), c);
                let conv = p.conv(&format!("{pre}.conv1"), c_out, c, 1);
                transitions.push(Transition { c_in: c, c_out, bn, conv });
                c = c_out;
            }
        }
        let head_bn = p.bn("bn1", c);
        let (fc_w, fc_b) = p.linear("fc", cfg.num_classes, c);
        Net { layout: p, stem_conv, stem_bn, blocks, transitions, head_bn, fc_w, fc_b }
    }
}
