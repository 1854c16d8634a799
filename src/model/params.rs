//! Parameters and BN running statistics: names (the reference state-dict names), shapes,
//! offsets in their flat buffers, and the reference initialization.
//!
//! Parameters, gradients and momentum share one layout: a tensor at offset `o` of the parameter
//! buffer has its gradient at `o` of the gradient buffer and its momentum at `o` of the
//! momentum buffer. Running statistics live in a second flat buffer.

use crate::rng;

/// How a tensor is initialized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// N(0, std) (convolutions: std = sqrt(2 / (k*k*cout)), fan-out He).
    Normal(f64),
    /// U(-b, b) (linear weight: PyTorch's default, b = 1/sqrt(fan_in)).
    Uniform(f64),
    /// A constant.
    Const(f32),
}

/// A named tensor in one of the flat buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Reference state-dict name.
    pub name: String,
    /// Offset in its flat buffer.
    pub off: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Initialization.
    pub init: Init,
}

impl Tensor {
    /// Element count.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A batch-norm layer's tensors: affine parameters (parameter buffer) and running statistics
/// (statistics buffer). Their names are in the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnParams {
    /// Channels.
    pub c: usize,
    /// Offset of the weight (gamma) in the parameter buffer.
    pub gamma: usize,
    /// Offset of the bias (beta) in the parameter buffer.
    pub beta: usize,
    /// Offset of `running_mean` in the statistics buffer.
    pub running_mean: usize,
    /// Offset of `running_var` in the statistics buffer.
    pub running_var: usize,
}

impl BnParams {
    /// The same batch norm restricted to channels `[c0, c0 + c)`.
    pub fn channels(&self, c0: usize, c: usize) -> BnParams {
        assert!(c0 + c <= self.c, "channels {c0}+{c} of {}", self.c);
        let at = |off: usize| off + c0;
        BnParams {
            c,
            gamma: at(self.gamma),
            beta: at(self.beta),
            running_mean: at(self.running_mean),
            running_var: at(self.running_var),
        }
    }
}

/// Every tensor of a network, in creation order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamLayout {
    /// Trainable tensors (one flat buffer).
    pub params: Vec<Tensor>,
    /// Floats in the parameter buffer.
    pub len: usize,
    /// BN running statistics (a second flat buffer).
    pub running: Vec<Tensor>,
    /// Floats in the statistics buffer.
    pub running_len: usize,
}

impl ParamLayout {
    fn push(list: &mut Vec<Tensor>, len: &mut usize, name: String, shape: Vec<usize>, init: Init) -> usize {
        let off = *len;
        *len += shape.iter().product::<usize>();
        list.push(Tensor { name, off, shape, init });
        off
    }

    /// Adds a bias-free convolution weight [cout, cin, k, k]; returns its offset.
    pub fn conv(&mut self, name: &str, cout: usize, cin: usize, k: usize) -> usize {
        let std = (2.0 / (k * k * cout) as f64).sqrt();
        Self::push(&mut self.params, &mut self.len, format!("{name}.weight"), vec![cout, cin, k, k], Init::Normal(std))
    }

    /// Adds a batch norm over `c` channels.
    pub fn bn(&mut self, prefix: &str, c: usize) -> BnParams {
        let p = |s: &mut Self, what: &str, v: f32| {
            Self::push(&mut s.params, &mut s.len, format!("{prefix}.{what}"), vec![c], Init::Const(v))
        };
        let gamma = p(self, "weight", 1.0);
        let beta = p(self, "bias", 0.0);
        let s = |s: &mut Self, what: &str, v: f32| {
            Self::push(&mut s.running, &mut s.running_len, format!("{prefix}.{what}"), vec![c], Init::Const(v))
        };
        let running_mean = s(self, "running_mean", 0.0);
        let running_var = s(self, "running_var", 1.0);
        BnParams { c, gamma, beta, running_mean, running_var }
    }

    /// Adds a linear layer (weight `[cout, cin]`, bias `[cout]`); returns (weight, bias) offsets.
    pub fn linear(&mut self, name: &str, cout: usize, cin: usize) -> (usize, usize) {
        let bound = 1.0 / (cin as f64).sqrt();
        let w = Self::push(
            &mut self.params,
            &mut self.len,
            format!("{name}.weight"),
            vec![cout, cin],
            Init::Uniform(bound),
        );
        let b = Self::push(&mut self.params, &mut self.len, format!("{name}.bias"), vec![cout], Init::Const(0.0));
        (w, b)
    }

    /// Initial values of tensor `index` of a list: it draws from stream (seed, index), so one
    /// tensor's values do not depend on the others.
    pub fn initial_tensor(t: &Tensor, index: usize, seed: u64) -> Vec<f32> {
        let key = rng::derive(seed, index as u64);
        (0..t.len() as u64)
            .map(|j| match t.init {
                Init::Normal(std) => (rng::normal(key, j) * std) as f32,
                Init::Uniform(b) => ((2.0 * rng::uniform(key, j) as f64 - 1.0) * b) as f32,
                Init::Const(c) => c,
            })
            .collect()
    }
}
