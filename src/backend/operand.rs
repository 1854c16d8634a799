//! The operands of the backend's ops, each a typed piece of the one arena: a [`Span`] (a run of
//! elements), a [`Matrix`] (a row-major span), a [`View`] (a channel slice of an NCHW tensor),
//! and the batch-norm groups built from spans. Every operand carries its [`DType`]; offsets
//! count bytes and strides count elements, so a 16-bit type extends these types instead of
//! redesigning them.

/// The type of an arena tensor's elements (only `f32` today).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision.
    #[default]
    F32,
    /// bfloat16: f32's sign and exponent, 7 bits of mantissa.
    BF16,
    /// IEEE 754 half precision.
    F16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// Byte alignment of every planned region: a cache line, enough for any vector load.
pub const ALIGN: usize = 64;

/// Rounds `bytes` up to a multiple of [`ALIGN`].
pub const fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN) * ALIGN
}

/// `len` elements of `dtype` at byte offset `off` of the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Byte offset of the first element.
    pub off: usize,
    /// Elements.
    pub len: usize,
    /// Element type.
    pub dtype: DType,
    /// The planned tensor it is part of (0: none; see [`View::tag`]).
    pub tag: u32,
}

impl Span {
    /// `len` f32 elements at byte offset `off`, untagged.
    pub fn f32(off: usize, len: usize) -> Span {
        Span { off, len, dtype: DType::F32, tag: 0 }
    }

    /// This span as part of planned tensor `tag`.
    pub fn tagged(self, tag: u32) -> Span {
        Span { tag, ..self }
    }

    /// Elements `[i, i + len)` of this span.
    pub fn at(self, i: usize, len: usize) -> Span {
        assert!(i + len <= self.len, "elements {i}+{len} out of {}", self.len);
        Span { off: self.off + i * self.dtype.size(), len, ..self }
    }

    /// Bytes it covers.
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }

    /// One past its last byte.
    pub fn end(&self) -> usize {
        self.off + self.bytes()
    }

    /// Index of its first element in an arena of its type (the offset must be aligned to it).
    pub fn index(&self) -> usize {
        debug_assert_eq!(self.off % self.dtype.size(), 0, "misaligned {self:?}");
        self.off / self.dtype.size()
    }

    /// This span as a row-major `rows` x `cols` matrix (exactly its length).
    pub fn matrix(self, rows: usize, cols: usize) -> Matrix {
        assert_eq!(rows * cols, self.len, "a {rows}x{cols} matrix of {self:?}");
        Matrix { data: self, rows, cols }
    }
}

/// A row-major `rows` x `cols` matrix (the classifier's operands).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matrix {
    /// Its elements, `rows * cols` of them.
    pub data: Span,
    /// Rows.
    pub rows: usize,
    /// Columns (elements per row).
    pub cols: usize,
}

impl Matrix {
    /// Its first `rows` rows.
    pub fn rows(self, rows: usize) -> Matrix {
        assert!(rows <= self.rows, "{rows} rows of a matrix of {}", self.rows);
        self.data.at(0, rows * self.cols).matrix(rows, self.cols)
    }
}

/// A channel slice of an NCHW tensor in the arena: `c` channels of `h*w` contiguous pixels
/// per image, images `img_stride` elements apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    /// Byte offset of image 0, channel 0 of the slice.
    pub off: usize,
    /// Images.
    pub n: usize,
    /// Channels in the slice.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Elements between consecutive images (at least `c * h * w`).
    pub img_stride: usize,
    /// Element type.
    pub dtype: DType,
    /// The planned tensor this view is part of (0: none). The planner gives each tensor its
    /// own tag and derived views keep it, so the plan audit ([`crate::model::audit`]) can tell
    /// two tensors that share memory apart.
    pub tag: u32,
}

impl View {
    /// A dense f32 [n, c, h, w] tensor at byte offset `off`, untagged.
    pub fn dense(off: usize, n: usize, c: usize, h: usize, w: usize) -> View {
        View { off, n, c, h, w, img_stride: c * h * w, dtype: DType::F32, tag: 0 }
    }

    /// This view as part of planned tensor `tag`.
    pub fn tagged(self, tag: u32) -> View {
        View { tag, ..self }
    }

    /// Image `i`'s `c * h * w` contiguous elements.
    pub fn image(&self, i: usize) -> Span {
        assert!(i < self.n, "image {i} of {}", self.n);
        let off = self.off + i * self.img_stride * self.dtype.size();
        Span { off, len: self.c * self.hw(), dtype: self.dtype, tag: self.tag }
    }

    /// All its elements as one span (a dense view: images back to back).
    pub fn span(&self) -> Span {
        assert!(self.n <= 1 || self.img_stride == self.c * self.hw(), "view {self:?} is not dense");
        Span { off: self.off, len: self.numel(), dtype: self.dtype, tag: self.tag }
    }

    /// The byte ranges `[start, end)` the view touches, one per image, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.n).map(move |i| {
            let s = self.image(i);
            (s.off, s.end())
        })
    }

    /// Whether the two views share an arena byte.
    pub fn overlaps(&self, other: &View) -> bool {
        if self.numel() == 0 || other.numel() == 0 || self.end() <= other.off || other.end() <= self.off {
            return false;
        }
        // Both lists of ranges are sorted: one merge walk.
        let (mut a, mut b) = (self.ranges().peekable(), other.ranges().peekable());
        while let (Some(&(a0, a1)), Some(&(b0, b1))) = (a.peek(), b.peek()) {
            if a0 < b1 && b0 < a1 {
                return true;
            }
            if a1 <= b1 {
                a.next();
            } else {
                b.next();
            }
        }
        false
    }

    /// Channels `[c0, c0 + c)` of this view.
    pub fn channels(self, c0: usize, c: usize) -> View {
        assert!(c0 + c <= self.c, "channel slice {c0}+{c} out of {}", self.c);
        View { off: self.off + c0 * self.hw() * self.dtype.size(), c, ..self }
    }

    /// Images `[i, i + n)` of this view.
    pub fn images(self, i: usize, n: usize) -> View {
        assert!(i + n <= self.n, "images {i}+{n} out of {}", self.n);
        View { off: self.off + i * self.img_stride * self.dtype.size(), n, ..self }
    }

    /// The first `n` images of this view.
    pub fn batch(self, n: usize) -> View {
        assert!(n <= self.n, "batch {n} larger than planned {}", self.n);
        View { n, ..self }
    }

    /// Pixels per channel plane.
    pub fn hw(&self) -> usize {
        self.h * self.w
    }

    /// Logical element count n*c*h*w.
    pub fn numel(&self) -> usize {
        self.n * self.c * self.hw()
    }

    /// Index of its first element in an arena of its type.
    pub fn index(&self) -> usize {
        debug_assert_eq!(self.off % self.dtype.size(), 0, "misaligned {self:?}");
        self.off / self.dtype.size()
    }

    /// One past the last arena byte the view touches.
    pub fn end(&self) -> usize {
        match self.n {
            0 => self.off,
            n => self.image(n - 1).end(),
        }
    }
}

/// Per-channel mean and variance (biased batch variance in training, running variance in
/// eval), one span of `c` elements each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moments {
    /// Mean.
    pub mean: Span,
    /// Variance.
    pub var: Span,
}

impl Moments {
    /// The moments of channels `[c0, c0 + c)`.
    pub fn channels(self, c0: usize, c: usize) -> Moments {
        Moments { mean: self.mean.at(c0, c), var: self.var.at(c0, c) }
    }
}

/// A batch norm's per-channel scale (gamma) and shift (beta), or their gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affine {
    /// Scale.
    pub gamma: Span,
    /// Shift.
    pub beta: Span,
}

/// Batch-norm operands: the statistics it normalizes with and its affine parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bn {
    /// Mean and variance.
    pub stats: Moments,
    /// Scale and shift.
    pub affine: Affine,
}

impl Bn {
    /// Its four spans: mean, variance, scale, shift.
    pub fn spans(&self) -> [Span; 4] {
        [self.stats.mean, self.stats.var, self.affine.gamma, self.affine.beta]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_count_bytes_and_strides_count_elements() {
        let v = View::dense(64, 2, 3, 2, 2);
        assert_eq!(v.channels(1, 2).off, 64 + 4 * 4);
        assert_eq!(v.images(1, 1).off, 64 + 12 * 4);
        assert_eq!(v.end(), 64 + 24 * 4);
        assert_eq!(v.index(), 16);
        assert_eq!(v.image(1), Span::f32(64 + 48, 12));
        let s = Span::f32(128, 10);
        assert_eq!((s.at(3, 4).off, s.at(3, 4).index(), s.end()), (140, 35, 168));
        assert_eq!(Span::f32(0, 6).matrix(2, 3).rows(1).data, Span::f32(0, 3));
        assert_eq!((aligned(1), aligned(64), aligned(65)), (64, 64, 128));
    }
}
