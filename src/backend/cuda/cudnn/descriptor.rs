//! What cuDNN is told about one convolution: its [`Geometry`] as tensor, filter and convolution
//! descriptors, each owned by one RAII wrapper, [`Descriptor`].
//!
//! Views are channel slices of larger NCHW buffers, so every tensor descriptor carries explicit
//! strides (image stride, h*w, w, 1).

use std::ffi::c_int;

use cudarc::cudnn::{result as cr, sys as cs};

use super::{err, status};
use crate::backend::{ConvShape, ConvSpec};
use crate::Result;

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
        (K::CREATE)().map(Descriptor).map_err(|e| status(K::CREATE_NAME, e))
    }

    /// The raw handle, for cuDNN calls (valid while `self` lives).
    pub(super) fn raw(&self) -> K::Raw {
        self.0
    }
}

impl<K: Kind> Drop for Descriptor<K> {
    fn drop(&mut self) {
        // SAFETY: created by `create`, destroyed once, here.
        let _ = unsafe { (K::DESTROY)(self.0) };
    }
}

/// [`Kind`] of a tensor descriptor.
pub(super) enum TensorKind {}

impl Kind for TensorKind {
    type Raw = cs::cudnnTensorDescriptor_t;
    const CREATE_NAME: &'static str = "cudnnCreateTensorDescriptor";
    const CREATE: fn() -> std::result::Result<Self::Raw, cr::CudnnError> = cr::create_tensor_descriptor;
    const DESTROY: unsafe fn(Self::Raw) -> std::result::Result<(), cr::CudnnError> = cr::destroy_tensor_descriptor;
}

/// [`Kind`] of a filter descriptor.
pub(super) enum FilterKind {}

impl Kind for FilterKind {
    type Raw = cs::cudnnFilterDescriptor_t;
    const CREATE_NAME: &'static str = "cudnnCreateFilterDescriptor";
    const CREATE: fn() -> std::result::Result<Self::Raw, cr::CudnnError> = cr::create_filter_descriptor;
    const DESTROY: unsafe fn(Self::Raw) -> std::result::Result<(), cr::CudnnError> = cr::destroy_filter_descriptor;
}

/// [`Kind`] of a convolution descriptor.
pub(super) enum ConvKind {}

impl Kind for ConvKind {
    type Raw = cs::cudnnConvolutionDescriptor_t;
    const CREATE_NAME: &'static str = "cudnnCreateConvolutionDescriptor";
    const CREATE: fn() -> std::result::Result<Self::Raw, cr::CudnnError> = cr::create_convolution_descriptor;
    const DESTROY: unsafe fn(Self::Raw) -> std::result::Result<(), cr::CudnnError> = cr::destroy_convolution_descriptor;
}

/// A float tensor descriptor [n, c, h, w] with strides (image stride, h*w, w, 1).
pub(super) type Tensor = Descriptor<TensorKind>;

/// A float filter descriptor [cout, cin, k, k].
pub(super) type Filter = Descriptor<FilterKind>;

/// A cross-correlation descriptor with f32 compute and FMA math (no TF32).
pub(super) type Conv = Descriptor<ConvKind>;

impl Tensor {
    fn new(dims: [usize; 4], img_stride: usize) -> Result<Tensor> {
        let t = Tensor::create()?;
        let [n, c, h, w] = dims;
        let dims = [int(n)?, int(c)?, int(h)?, int(w)?];
        let strides = [int(img_stride)?, int(h * w)?, int(w)?, 1];
        // SAFETY: `t` is a live descriptor.
        unsafe { cr::set_tensor4d_descriptor_ex(t.0, cs::cudnnDataType_t::CUDNN_DATA_FLOAT, dims, strides) }
            .map_err(|e| status("cudnnSetTensor4dDescriptorEx", e))?;
        Ok(t)
    }
}

impl Filter {
    fn new(dims: [usize; 4]) -> Result<Filter> {
        let f = Filter::create()?;
        let dims = [int(dims[0])?, int(dims[1])?, int(dims[2])?, int(dims[3])?];
        // SAFETY: `f` is a live descriptor.
        unsafe {
            cr::set_filter4d_descriptor(
                f.0,
                cs::cudnnDataType_t::CUDNN_DATA_FLOAT,
                cs::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                dims,
            )
        }
        .map_err(|e| status("cudnnSetFilter4dDescriptor", e))?;
        Ok(f)
    }
}

impl Conv {
    fn new(spec: ConvSpec) -> Result<Conv> {
        let c = Conv::create()?;
        let (pad, stride) = (int(spec.pad)?, int(spec.stride)?);
        // SAFETY: `c` is a live descriptor.
        unsafe {
            cr::set_convolution2d_descriptor(
                c.0,
                pad,
                pad,
                stride,
                stride,
                1,
                1,
                cs::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                cs::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(|e| status("cudnnSetConvolution2dDescriptor", e))?;
            cr::set_convolution_math_type(c.0, cs::cudnnMathType_t::CUDNN_FMA_MATH)
                .map_err(|e| status("cudnnSetConvolutionMathType", e))?;
        }
        Ok(c)
    }
}

/// `v` as a C int for a descriptor.
fn int(v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| err(format!("a convolution dimension or stride ({v}) is too large for cuDNN")))
}
