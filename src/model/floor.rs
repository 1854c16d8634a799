//! The memory floor of an exact training step: what any implementation that recomputes no
//! block features must hold at its worst point, from the network's geometry alone (independent
//! of the plan, which it bounds from below).
//!
//! ```text
//! floor = parameters + gradients + momentum + running statistics + the input batch
//!         + max( max over blocks b of [feature buffers of blocks 1..b + block b's gradient],
//!                for ImageNet stems: the stem conv output + its gradient )
//! ```
//!
//! During block b's backward, the features of blocks 1..b are still to be read (block b's by
//! its own backward, the earlier ones by theirs) and block b's gradient is being formed; the
//! later blocks are done. An ImageNet stem's full-resolution output and its gradient meet at
//! the end of backward.

use super::net::Net;
use crate::backend::DType;
use crate::config::{NetConfig, Stem};
use crate::input::CHANNELS;
use crate::Result;

/// The floor in bytes of an exact training step of `cfg` on batches of `batch` images of
/// `h` x `w`: the state in f32, the input and the block tensors in the precision's storage.
pub fn floor_bytes(cfg: &NetConfig, batch: usize, h: usize, w: usize) -> Result<usize> {
    let geo = cfg.geometry(h, w)?;
    let layout = Net::new(cfg).layout;
    let state = DType::F32.size() * (3 * layout.len + layout.running_len);
    let stored = |n: usize| n * cfg.precision.storage().size();
    let input = stored(batch * CHANNELS * h * w);
    let mut features = 0;
    let mut worst = 0;
    for g in &geo {
        let block = stored(batch * g.c_final * g.h * g.w);
        features += block;
        worst = worst.max(features + block);
    }
    if cfg.stem == Stem::ImageNet {
        worst = worst.max(2 * stored(batch * cfg.stem_channels * (h / 2) * (w / 2)));
    }
    Ok(state + input + worst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Precision;

    /// DenseNet-BC-100-12 at batch 64 by hand: 769,162 parameters three times and 2 x 3,248
    /// running statistics; the 32x32 input; block 1's 216 channels at 32x32, twice.
    #[test]
    fn the_floor_of_bc_100_12_by_hand() {
        let cfg = NetConfig::cifar(100, 12, true, 0.5, 0.0, 10).unwrap();
        let running = Net::new(&cfg).layout.running_len;
        let by_hand = 4 * (3 * 769_162 + running + 64 * 3 * 32 * 32 + 2 * 64 * 216 * 32 * 32);
        assert_eq!(floor_bytes(&cfg, 64, 32, 32).unwrap(), by_hand);
        assert!((122e6..124e6).contains(&(by_hand as f64)), "about 123 MB: {by_hand}");
        // In 16 bits, the input and the block tensors take half.
        for precision in [Precision::Bf16, Precision::Fp16] {
            let half = 4 * (3 * 769_162 + running) + 2 * (64 * 3 * 32 * 32 + 2 * 64 * 216 * 32 * 32);
            assert_eq!(floor_bytes(&NetConfig { precision, ..cfg.clone() }, 64, 32, 32).unwrap(), half);
        }
    }

    /// DenseNet-121 at 224x224: block 1 (256 channels at 56x56, twice) outweighs the stem
    /// (64 channels at 112x112, twice) and the later blocks.
    #[test]
    fn the_floor_of_densenet121_is_block_1() {
        let cfg = NetConfig::imagenet("densenet121").unwrap();
        let lay = Net::new(&cfg).layout;
        let (n, f) = (8, 4);
        let by_hand = f * (3 * lay.len + lay.running_len + n * 3 * 224 * 224 + 2 * n * 256 * 56 * 56);
        assert_eq!(floor_bytes(&cfg, n, 224, 224).unwrap(), by_hand);
        // A stem wider than block 1's output is the worst point instead.
        let wide = NetConfig { stem_channels: 1024, ..cfg };
        let lay = Net::new(&wide).layout;
        let stem = f * 2 * n * 1024 * 112 * 112;
        assert_eq!(
            floor_bytes(&wide, n, 224, 224).unwrap(),
            f * (3 * lay.len + lay.running_len + n * 3 * 224 * 224) + stem
        );
    }
}
