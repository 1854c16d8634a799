// Pooling forward and backward: 2x2 average (transitions), 3x3/2 max with padding 1 (the
// ImageNet stem, optionally reading the BN-ReLU of its input) and global average (the head).
// One thread per output element; backward passes gather, so no atomics and
// bitwise-reproducible results.
#include "dn.cuh"

// Views hold any storage type T (DN_STORAGE_KERNELS); the head's pooled features are f32.

// y = mean of each 2x2 window of x (h x w in, h/2 x w/2 out).
template <class T>
__device__ void avg_pool2(Buf<const T> x, u64 x_stride, Buf<T> y, u64 y_stride, int n, int c, int h, int w) {
    const int oh = h / 2, ow = w / 2;
    u64 img, plane;
    int p;
    if (!dn_element(n, c, oh * ow, img, plane, p)) return;
    const int oy = p / ow, ox = p - oy * ow;
    const u64 s = img * x_stride + plane * h * w + (u64)(2 * oy) * w + 2 * ox;
    const float sum = dn_get(x[s]) + dn_get(x[s + 1]) + dn_get(x[s + w]) + dn_get(x[s + w + 1]);
    y[img * y_stride + plane * oh * ow + p] = dn_put<T>(0.25f * sum);
}
DN_STORAGE_KERNELS(avg_pool2, (Buf<const T> x, u64 x_stride, Buf<T> y, u64 y_stride, int n, int c, int h, int w),
                   (x, x_stride, y, y_stride, n, c, h, w))

// gx = gy / 4 spread over each window (0 where no window covers a pixel: odd sizes).
template <class T>
__device__ void avg_pool2_backward(Buf<const T> gy, u64 gy_stride, Buf<T> gx, u64 gx_stride, int n, int c, int h,
                                   int w) {
    const int oh = h / 2, ow = w / 2;
    u64 img, plane;
    int p;
    if (!dn_element(n, c, h * w, img, plane, p)) return;
    const int iy = p / w, ix = p - iy * w, oy = iy / 2, ox = ix / 2;
    const bool covered = oy < oh && ox < ow;
    gx[img * gx_stride + plane * h * w + p] =
        dn_put<T>(covered ? 0.25f * dn_get(gy[img * gy_stride + plane * oh * ow + (u64)oy * ow + ox]) : 0.0f);
}
DN_STORAGE_KERNELS(avg_pool2_backward,
                   (Buf<const T> gy, u64 gy_stride, Buf<T> gx, u64 gx_stride, int n, int c, int h, int w),
                   (gy, gy_stride, gx, gx_stride, n, c, h, w))

// Output size of a 3x3/2 window with padding 1 over an input of size h.
__device__ __forceinline__ int dn_pool3_out(int h) { return (h - 1) / 2 + 1; }

// The values a 3x3 max pool reads from one input plane (at `base` in x): x itself, or with
// `pre` the BN-ReLU of the plane's channel (dn_bn_relu: the bn_relu kernel's values, not stored,
// rounded to T as a stored one is).
template <class T>
struct DnPoolInput {
    Buf<const T> x;
    u64 base;
    int pre;
    float scale, shift;
    __device__ float operator[](int i) const {
        const float v = dn_get(x[base + i]);
        return pre ? dn_round<T>(dn_bn_relu(v, scale, shift)) : v;
    }
};

// Plane `base` of x, of channel `ch`, through the BN-ReLU of mean, var, gamma, beta when `pre`
// (which are not read otherwise).
template <class T, class P>
__device__ DnPoolInput<T> dn_pool_input(Buf<const T> x, u64 base, int ch, int pre, P mean, P var, P gamma, P beta) {
    float scale = 1.0f, shift = 0.0f, inv_std;
    if (pre) bn_affine(mean, var, gamma, beta, ch, scale, shift, inv_std);
    return DnPoolInput<T>{x, base, pre, scale, shift};
}

// Flat index (in the plane) of the first maximum of 3x3/2 window (oy, ox), padding 1 (padding
// never wins; NaN wins as on the CPU).
template <class T>
__device__ int dn_argmax3(const DnPoolInput<T>& x, int h, int w, int oy, int ox) {
    float best = -INFINITY;
    int arg = -1;
    for (int iy = max(2 * oy - 1, 0); iy < min(2 * oy + 2, h); iy++) {
        for (int ix = max(2 * ox - 1, 0); ix < min(2 * ox + 2, w); ix++) {
            const float v = x[iy * w + ix];
            if (v > best || arg < 0 || v != v) {
                best = v;
                arg = iy * w + ix;
            }
        }
    }
    return arg;
}

// y = max over each 3x3/2 window with padding 1 of x, or of relu(bn(x)) when `pre`.
template <class T>
__device__ void max_pool3(Buf<const T> x, u64 x_stride, Buf<T> y, u64 y_stride, int n, int c, int h, int w, int pre,
                          Buf<const float> mean, Buf<const float> var, Buf<const float> gamma,
                          Buf<const float> beta) {
    const int oh = dn_pool3_out(h), ow = dn_pool3_out(w);
    u64 img, plane;
    int p;
    if (!dn_element(n, c, oh * ow, img, plane, p)) return;
    const int oy = p / ow, ox = p - oy * ow;
    const DnPoolInput<T> in = dn_pool_input(x, img * x_stride + plane * h * w, (int)plane, pre, mean, var, gamma, beta);
    y[img * y_stride + plane * oh * ow + p] = dn_put<T>(in[dn_argmax3(in, h, w, oy, ox)]);
}
DN_STORAGE_KERNELS(max_pool3,
                   (Buf<const T> x, u64 x_stride, Buf<T> y, u64 y_stride, int n, int c, int h, int w, int pre,
                    Buf<const float> mean, Buf<const float> var, Buf<const float> gamma, Buf<const float> beta),
                   (x, x_stride, y, y_stride, n, c, h, w, pre, mean, var, gamma, beta))

// gx[pixel] = sum of gy over the windows whose first maximum (of x, or of relu(bn(x)) when
// `pre`) is this pixel.
template <class T>
__device__ void max_pool3_backward(Buf<const T> x, u64 x_stride, Buf<const T> gy, u64 gy_stride, Buf<T> gx,
                                   u64 gx_stride, int n, int c, int h, int w, int pre, Buf<const float> mean,
                                   Buf<const float> var, Buf<const float> gamma, Buf<const float> beta) {
    const int oh = dn_pool3_out(h), ow = dn_pool3_out(w);
    u64 img, plane;
    int p;
    if (!dn_element(n, c, h * w, img, plane, p)) return;
    const int iy = p / w, ix = p - iy * w;
    const DnPoolInput<T> in = dn_pool_input(x, img * x_stride + plane * h * w, (int)plane, pre, mean, var, gamma, beta);
    const u64 gp = img * gy_stride + plane * oh * ow;
    float sum = 0.0f;
    // Windows covering row iy: 2 oy - 1 <= iy <= 2 oy + 1.
    for (int oy = iy / 2; oy <= min((iy + 1) / 2, oh - 1); oy++) {
        for (int ox = ix / 2; ox <= min((ix + 1) / 2, ow - 1); ox++) {
            if (dn_argmax3(in, h, w, oy, ox) == p) sum += dn_get(gy[gp + (u64)oy * ow + ox]);
        }
    }
    gx[img * gx_stride + plane * h * w + p] = dn_put<T>(sum);
}
DN_STORAGE_KERNELS(max_pool3_backward,
                   (Buf<const T> x, u64 x_stride, Buf<const T> gy, u64 gy_stride, Buf<T> gx, u64 gx_stride, int n,
                    int c, int h, int w, int pre, Buf<const float> mean, Buf<const float> var,
                    Buf<const float> gamma, Buf<const float> beta),
                   (x, x_stride, gy, gy_stride, gx, gx_stride, n, c, h, w, pre, mean, var, gamma, beta))

// y[img * c + plane] = mean of the plane (summed in f64).
template <class T>
__device__ void global_avg_pool(Buf<const T> x, u64 x_stride, Buf<float> y, int n, int c, int hw) {
    const u64 i = dn_index();
    if (i >= (u64)n * c) return;
    const u64 img = i / c, o = img * x_stride + (i - img * c) * hw;
    double s = 0.0;
    for (int p = 0; p < hw; p++) s += dn_get(x[o + p]);
    y[i] = (float)(s / hw);
}
DN_STORAGE_KERNELS(global_avg_pool, (Buf<const T> x, u64 x_stride, Buf<float> y, int n, int c, int hw),
                   (x, x_stride, y, n, c, hw))

// gx = gy[img * c + plane] / hw over the plane.
template <class T>
__device__ void global_avg_pool_backward(Buf<const float> gy, Buf<T> gx, u64 gx_stride, int n, int c, int hw) {
    u64 img, plane;
    int p;
    if (!dn_element(n, c, hw, img, plane, p)) return;
    gx[img * gx_stride + plane * hw + p] = dn_put<T>(gy[img * c + plane] / (float)hw);
}
DN_STORAGE_KERNELS(global_avg_pool_backward, (Buf<const float> gy, Buf<T> gx, u64 gx_stride, int n, int c, int hw),
                   (gy, gx, gx_stride, n, c, hw))
