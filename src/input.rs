//! The input ops' vocabulary, below `backend`, `model` and `data`, which all use it: a batch's
//! images as the model takes them ([`Input`]), the per-channel normalization table of stored
//! bytes ([`Normalize`]), and the crop window that pads, cuts and mirrors an image ([`Crop`]).
//! Which normalization and which windows a dataset uses is `data`'s business.

use crate::elem::Elem;

/// Zero padding on each side of an image before its crop window is cut.
pub const PAD: usize = 4;

/// Channels of an input image (R, G, B planes).
pub const CHANNELS: usize = 3;

/// Values a stored pixel byte takes: the entries of a channel's normalization table.
pub const LEVELS: usize = u8::MAX as usize + 1;

/// A batch's images as the model takes them.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    /// Normalized floats [n, 3, h, w].
    Floats(&'a [f32]),
    /// Stored images (bytes [n, 3, h, w]) with their crop windows and normalization, applied
    /// by the backend (`Backend::augment`: on the device for the CUDA backend), then upsampled
    /// to the model's size, a whole multiple of theirs.
    Stored {
        /// The stored bytes.
        bytes: &'a [u8],
        /// Height of a stored image.
        h: usize,
        /// Width of a stored image.
        w: usize,
        /// One window per image.
        crops: &'a [Crop],
        /// The normalization.
        norm: &'a Normalize,
    },
}

impl<'a> Input<'a> {
    /// Images `range` of a batch of `n` (a data-parallel rank's shard); the whole input when
    /// its length is not `n` images' or its crop windows not `n` (the model then reports it).
    pub fn images(self, range: std::ops::Range<usize>, n: usize) -> Input<'a> {
        let (len, windows) = match self {
            Input::Floats(f) => (f.len(), n),
            Input::Stored { bytes, crops, .. } => (bytes.len(), crops.len()),
        };
        if n == 0 || !len.is_multiple_of(n) || windows != n {
            return self;
        }
        let cut = (len / n) * range.start..(len / n) * range.end;
        match self {
            Input::Floats(f) => Input::Floats(&f[cut]),
            Input::Stored { bytes, h, w, crops, norm } => {
                Input::Stored { bytes: &bytes[cut], h, w, crops: &crops[range], norm }
            }
        }
    }
}

/// Per-channel normalization of 0..255 bytes: `(v / 255 - mean) / std`, as a lookup table.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    table: [[f32; LEVELS]; CHANNELS],
}

impl Normalize {
    /// Normalization by `mean` and `std` given on the 0..255 scale. Computed in f32 from the
    /// f32 constants, as torchvision's `ToTensor` then `Normalize` do.
    pub fn new(mean: [f64; CHANNELS], std: [f64; CHANNELS]) -> Normalize {
        let mut table = [[0.0; LEVELS]; CHANNELS];
        for (c, row) in table.iter_mut().enumerate() {
            let (m, s) = ((mean[c] / 255.0) as f32, (std[c] / 255.0) as f32);
            for (v, x) in row.iter_mut().enumerate() {
                *x = (v as f32 / 255.0 - m) / s;
            }
        }
        Normalize { table }
    }

    /// The normalized value of byte `v` in channel `c`.
    pub fn value(&self, c: usize, v: u8) -> f32 {
        self.table[c][v as usize]
    }

    /// The whole table: entry `LEVELS * c + v` is [`Normalize::value`]`(c, v)`.
    pub fn table(&self) -> &[f32] {
        self.table.as_flattened()
    }
}

/// Where an image's window lies in the image zero-padded by [`PAD`] (the window has the
/// image's size), and whether it is mirrored. The window is cut at the stored size, then
/// upsampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crop {
    /// Top row of the window in the padded image, 0..=2*PAD (PAD: centered).
    pub top: usize,
    /// Left column of the window in the padded image, 0..=2*PAD.
    pub left: usize,
    /// Mirror the window left to right.
    pub flip: bool,
}

impl Crop {
    /// The identity: the image as stored.
    pub const NONE: Crop = Crop { top: PAD, left: PAD, flip: false };

    /// Writes image `src` (bytes, [`CHANNELS`] planes of `h` x `w`) through this window,
    /// normalized and upsampled by `scale` (each pixel a `scale` x `scale` square, nearest
    /// neighbour), into `dst` (`scale`² as many elements, each rounded once to its type).
    pub fn apply<T: Elem>(self, src: &[u8], norm: &Normalize, h: usize, w: usize, scale: usize, dst: &mut [T]) {
        let (plane, ow) = (h * w, w * scale);
        let out_plane = plane * scale * scale;
        assert!(
            src.len() == CHANNELS * plane && dst.len() == CHANNELS * out_plane,
            "one 3 x {h} x {w} image, x{scale}"
        );
        for (c, (src, dst)) in src.chunks_exact(plane).zip(dst.chunks_exact_mut(out_plane)).enumerate() {
            let zero = T::put(norm.value(c, 0));
            for (y, out) in dst.chunks_exact_mut(ow).enumerate() {
                // Row y of the output is row y / scale of the window: padded row top + y / scale,
                // source row top + y / scale - PAD.
                let Some(row) = (y / scale + self.top).checked_sub(PAD).filter(|&r| r < h) else {
                    out.fill(zero);
                    continue;
                };
                let row = &src[row * w..(row + 1) * w];
                for (x, o) in out.iter_mut().enumerate() {
                    let x = x / scale;
                    let col = if self.flip { w - 1 - x } else { x } + self.left;
                    *o = match col.checked_sub(PAD).filter(|&c| c < w) {
                        Some(col) => T::put(norm.value(c, row[col])),
                        None => zero,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3 x 32 x 32 image whose byte at (c, y, x) is 64c + y + x: every pixel of a plane tells
    /// its place.
    fn gradient() -> Vec<u8> {
        (0..3072).map(|i| ((i / 1024) * 64 + (i / 32) % 32 + i % 32) as u8).collect()
    }

    fn at(img: &[f32], c: usize, y: usize, x: usize) -> f32 {
        img[c * 1024 + y * 32 + x]
    }

    fn norm() -> Normalize {
        Normalize::new([125.3, 123.0, 113.9], [63.0, 62.1, 66.7])
    }

    #[test]
    fn normalization_is_the_reference_formula() {
        let expect = (200.0f32 / 255.0 - (123.0f64 / 255.0) as f32) / (62.1f64 / 255.0) as f32;
        assert_eq!(norm().value(1, 200), expect);
        assert_eq!(norm().table()[256 + 200], expect);
    }

    #[test]
    fn identity_crop_copies() {
        let (src, n) = (gradient(), norm());
        let mut out = vec![0.0; 3072];
        Crop::NONE.apply(&src, &n, 32, 32, 1, &mut out);
        let expect: Vec<f32> = src.iter().enumerate().map(|(i, &v)| n.value(i / 1024, v)).collect();
        assert_eq!(out, expect);
    }

    #[test]
    fn crop_shifts_and_pads_with_normalized_zero() {
        let (src, n) = (gradient(), norm());
        let mut out = vec![0.0; 3072];
        // Window at the top-left corner of the padded image: shifted down-right by 4.
        Crop { top: 0, left: 0, flip: false }.apply(&src, &n, 32, 32, 1, &mut out);
        for c in 0..3 {
            assert_eq!(at(&out, c, 0, 10), n.value(c, 0), "padded row");
            assert_eq!(at(&out, c, 10, 3), n.value(c, 0), "padded column");
            assert_eq!(at(&out, c, 4, 4), n.value(c, src[c * 1024]));
            assert_eq!(at(&out, c, 31, 31), n.value(c, src[c * 1024 + 27 * 32 + 27]));
        }
        // Bottom-right corner: shifted up-left by 4.
        Crop { top: 8, left: 8, flip: false }.apply(&src, &n, 32, 32, 1, &mut out);
        assert_eq!(at(&out, 2, 0, 0), n.value(2, src[2 * 1024 + 4 * 32 + 4]));
        assert_eq!(at(&out, 2, 28, 5), n.value(2, 0));
        assert_eq!(at(&out, 2, 5, 28), n.value(2, 0));
    }

    #[test]
    fn flip_mirrors_the_window() {
        let (src, n) = (gradient(), norm());
        let (mut plain, mut flipped) = (vec![0.0; 3072], vec![0.0; 3072]);
        let crop = Crop { top: 2, left: 7, flip: false };
        crop.apply(&src, &n, 32, 32, 1, &mut plain);
        Crop { flip: true, ..crop }.apply(&src, &n, 32, 32, 1, &mut flipped);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    assert_eq!(at(&flipped, c, y, x), at(&plain, c, y, 31 - x));
                }
            }
        }
        // Flipping the stored image itself mirrors its columns.
        Crop { flip: true, ..Crop::NONE }.apply(&src, &n, 32, 32, 1, &mut flipped);
        assert_eq!(at(&flipped, 1, 3, 0), n.value(1, src[1024 + 3 * 32 + 31]));
    }

    /// Images of any size, not square: the window has the image's size.
    #[test]
    fn windows_fit_any_image_size() {
        let (h, w, n) = (5, 8, norm());
        let src: Vec<u8> = (0..3 * h * w).map(|i| i as u8).collect();
        let mut out = vec![0.0; src.len()];
        Crop { top: PAD + 1, left: PAD - 2, flip: false }.apply(&src, &n, h, w, 1, &mut out);
        // Output (y, x) is source (y + 1, x - 2): zero in the last row and first two columns.
        assert_eq!(out[w + 2], n.value(0, src[2 * w]));
        assert_eq!(out[(h - 1) * w + 3], n.value(0, 0));
        assert_eq!(out[2 * h * w + w + 1], n.value(2, 0));
    }

    /// Upsampling by 3 of a 5 x 7 image, through windows in the corners, the center and off
    /// it, mirrored or not: output pixel (y, x) is the window's pixel (y / 3, x / 3).
    #[test]
    fn upsampling_repeats_each_window_pixel() {
        let (h, w, s, n) = (5, 7, 3, norm());
        let src: Vec<u8> = (0..3 * h * w).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = vec![0.0; src.len() * s * s];
        for (top, left) in [(0, 0), (PAD, PAD), (2 * PAD, 2 * PAD), (PAD + 2, PAD - 3), (1, 2 * PAD)] {
            for flip in [false, true] {
                Crop { top, left, flip }.apply(&src, &n, h, w, s, &mut out);
                for c in 0..3 {
                    for y in 0..h * s {
                        for x in 0..w * s {
                            let col = if flip { w - 1 - x / s } else { x / s };
                            let (r, q) = ((top + y / s) as isize - PAD as isize, (left + col) as isize - PAD as isize);
                            let inside = (0..h as isize).contains(&r) && (0..w as isize).contains(&q);
                            let v = if inside { src[c * h * w + r as usize * w + q as usize] } else { 0 };
                            let got = out[(c * h * s + y) * w * s + x];
                            assert_eq!(got, n.value(c, v), "window ({top}, {left}, {flip}) at ({c}, {y}, {x})");
                        }
                    }
                }
            }
        }
    }
}
