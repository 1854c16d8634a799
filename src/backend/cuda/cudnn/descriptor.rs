//! What cuDNN is told about one convolution: its [`Geometry`] as tensor, filter and convolution
//! descriptors, each owned by one RAII wrapper, [`Descriptor`].
//!
//! Views are channel slices of larger NCHW buffers, so every tensor descriptor carries explicit
//! strides (image stride, h*w, w, 1).

use std::ffi::c_int;

use cudarc::cudnn::{result as cr, sys as cs};

use super::cudnn_failed;
use crate::backend::{ConvShape, ConvSpec};
use crate::{Error, Result};

/// Dilation of every convolution: none (the network has no dilated convolutions).
const DILATION: c_int = 1;

/// A convolution as cuDNN sees it when run: per-image shape, batch, and the views' strides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Geometry {
    /// The convolution and the per-image input size.
    pub(super) shape: ConvShape,
    /// Images.
    pub(super) n: usize,
    /// The input side's image stride, in elements.
    pub(super) x_stride: usize,
    /// The output side's image stride, in elements.
    pub(super) y_stride: usize,
}

/// The descriptors of one geometry: input side, output side, filter and convolution.
pub(super) struct Descriptors {
    /// x (or gx): [n, cin, h, w].
    pub(super) x: Tensor,
    /// y (or gy): [n, cout, oh, ow].
    pub(super) y: Tensor,
    /// w (or gw): [cout, cin, k, k].
    pub(super) w: Filter,
    /// Padding and stride.
    pub(super) conv: Conv,
}

impl Descriptors {
    /// The descriptors of `g`.
    pub(super) fn new(g: Geometry) -> Result<Descriptors> {
        let s = g.shape;
        let (oh, ow) = (s.spec.out(s.h), s.spec.out(s.w));
        Ok(Descriptors {
            x: Tensor::new([g.n, s.cin, s.h, s.w], g.x_stride)?,
            y: Tensor::new([g.n, s.cout, oh, ow], g.y_stride)?,
            w: Filter::new([s.cout, s.cin, s.spec.k, s.spec.k])?,
            conv: Conv::new(s.spec)?,
        })
    }

    /// The raw handles `(x, w, y, conv)`, for cuDNN calls (valid while `self` lives).
    pub(super) fn raw(
        &self,
    ) -> (
        cs::cudnnTensorDescriptor_t,
        cs::cudnnFilterDescriptor_t,
        cs::cudnnTensorDescriptor_t,
        cs::cudnnConvolutionDescriptor_t,
    ) {
        (self.x.0, self.w.0, self.y.0, self.conv.0)
    }
}

/// A kind of cuDNN descriptor: its raw handle and the calls that create and destroy one.
pub(super) trait Kind {
    /// The raw handle (`cudnnTensorDescriptor_t` and the like).
    type Raw: Copy;
    /// The C function `CREATE` calls, for errors.
    const CREATE_NAME: &'static str;
    /// Creates a descriptor.
    const CREATE: fn() -> std::result::Result<Self::Raw, cr::CudnnError>;
    /// Destroys a descriptor `CREATE` made; unsafe: it must not be used again.
    const DESTROY: unsafe fn(Self::Raw) -> std::result::Result<(), cr::CudnnError>;
}

/// A live cuDNN descriptor of kind `K`, destroyed when dropped.
pub(super) struct Descriptor<K: Kind>(K::Raw);

impl<K: Kind> Descriptor<K> {
    /// A new descriptor, not yet set.
    fn create() -> Result<Self> {
        (K::CREATE)().map(Descriptor).map_err(|e| cudnn_failed(K::CREATE_NAME, e))
    }
}

impl<K: Kind> Drop for Descriptor<K> {
    fn drop(&mut self) {
        // SAFETY: created by `create`, destroyed once, here.
        let _ = unsafe { (K::DESTROY)(self.0) };
    }
}

/// Declares `$kind`, the [`Kind`] of cuDNN descriptor `$raw`, made by cudarc's `$create` (the C
/// function `$name`) and destroyed by `$destroy`.
macro_rules! kind {
    ($(#[$doc:meta])* $kind:ident, $raw:ty, $name:literal, $create:ident, $destroy:ident) => {
        $(#[$doc])*
        pub(super) enum $kind {}

        impl Kind for $kind {
            type Raw = $raw;
            const CREATE_NAME: &'static str = $name;
            const CREATE: fn() -> std::result::Result<Self::Raw, cr::CudnnError> = cr::$create;
            const DESTROY: unsafe fn(Self::Raw) -> std::result::Result<(), cr::CudnnError> = cr::$destroy;
        }
    };
}

kind!(
    /// [`Kind`] of a tensor descriptor.
    TensorKind,
    cs::cudnnTensorDescriptor_t,
    "cudnnCreateTensorDescriptor",
    create_tensor_descriptor,
    destroy_tensor_descriptor
);
kind!(
    /// [`Kind`] of a filter descriptor.
    FilterKind,
    cs::cudnnFilterDescriptor_t,
    "cudnnCreateFilterDescriptor",
    create_filter_descriptor,
    destroy_filter_descriptor
);
kind!(
    /// [`Kind`] of a convolution descriptor.
    ConvKind,
    cs::cudnnConvolutionDescriptor_t,
    "cudnnCreateConvolutionDescriptor",
    create_convolution_descriptor,
    destroy_convolution_descriptor
);

/// A float tensor descriptor [n, c, h, w] with strides (image stride, h*w, w, 1).
pub(super) type Tensor = Descriptor<TensorKind>;

/// A float filter descriptor [cout, cin, k, k].
pub(super) type Filter = Descriptor<FilterKind>;

/// A cross-correlation descriptor with f32 compute and FMA math (no TF32).
pub(super) type Conv = Descriptor<ConvKind>;

impl Tensor {
    fn new(dims: [usize; 4], img_stride: usize) -> Result<Tensor> {
        let t = Tensor::create()?;
        let [_, _, h, w] = dims;
        let (dims, strides) = (c_ints(dims)?, c_ints([img_stride, h * w, w, 1])?);
        // SAFETY: `t` is a live descriptor this function owns; the rest are plain values.
        unsafe { cr::set_tensor4d_descriptor_ex(t.0, cs::cudnnDataType_t::CUDNN_DATA_FLOAT, dims, strides) }
            .map_err(|e| cudnn_failed("cudnnSetTensor4dDescriptorEx", e))?;
        Ok(t)
    }
}

impl Filter {
    fn new(dims: [usize; 4]) -> Result<Filter> {
        let f = Filter::create()?;
        let dims = c_ints(dims)?;
        // SAFETY: `f` is a live descriptor this function owns; the rest are plain values.
        unsafe {
            cr::set_filter4d_descriptor(
                f.0,
                cs::cudnnDataType_t::CUDNN_DATA_FLOAT,
                cs::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                dims,
            )
        }
        .map_err(|e| cudnn_failed("cudnnSetFilter4dDescriptor", e))?;
        Ok(f)
    }
}

impl Conv {
    fn new(spec: ConvSpec) -> Result<Conv> {
        let c = Conv::create()?;
        let [pad, stride] = c_ints([spec.pad, spec.stride])?;
        // SAFETY: `c` is a live descriptor this function owns; the rest are plain values.
        unsafe {
            cr::set_convolution2d_descriptor(
                c.0,
                pad,
                pad,
                stride,
                stride,
                DILATION,
                DILATION,
                cs::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                cs::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(|e| cudnn_failed("cudnnSetConvolution2dDescriptor", e))?;
            cr::set_convolution_math_type(c.0, cs::cudnnMathType_t::CUDNN_FMA_MATH)
                .map_err(|e| cudnn_failed("cudnnSetConvolutionMathType", e))?;
        }
        Ok(c)
    }
}

/// `v` as the C ints a descriptor takes, or an error for the first that does not fit.
fn c_ints<const N: usize>(v: [usize; N]) -> Result<[c_int; N]> {
    let mut out = [0; N];
    for (o, &x) in out.iter_mut().zip(&v) {
        *o = c_int::try_from(x)
            .map_err(|_| Error(format!("a convolution dimension or stride ({x}) is too large for cuDNN")))?;
    }
    Ok(out)
}
