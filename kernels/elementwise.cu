// Elementwise ops: view copies, dropout with the counter-based RNG of src/rng.rs, and the SGD
// update over the flat parameter buffer. One thread per element, 1-D grids. Views hold any
// storage type T (DN_STORAGE_KERNELS).
#include "dn.cuh"

// dst = src for n images of `len` contiguous elements each.
template <class T>
__device__ void copy_images(Buf<const T> src, u64 src_stride, Buf<T> dst, u64 dst_stride, int n, u64 len) {
    const u64 i = dn_index();
    if (i >= (u64)n * len) return;
    const u64 img = i / len, r = i - img * len;
    dst[img * dst_stride + r] = src[img * src_stride + r];
}
DN_STORAGE_KERNELS(copy_images, (Buf<const T> src, u64 src_stride, Buf<T> dst, u64 dst_stride, int n, u64 len),
                   (src, src_stride, dst, dst_stride, n, len))

// SplitMix64's finalizer (rng::mix64).
__device__ __forceinline__ u64 dn_mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 bits: element `index` of stream `key` (rng::uniform).
__device__ __forceinline__ float dn_uniform(u64 key, u64 index) {
    return (float)(dn_mix64(key + index * 0x9e3779b97f4a7c15ULL) >> 40) * (1.0f / 16777216.0f);
}

// In place: x = 0 where uniform(key, i) < p, else x * keep; i is the logical NCHW index over
// n images of `len` elements.
template <class T>
__device__ void dropout(Buf<T> x, u64 stride, int n, u64 len, float p, float keep, u64 key) {
    const u64 i = dn_index();
    if (i >= (u64)n * len) return;
    const u64 img = i / len, o = img * stride + (i - img * len);
    x[o] = dn_put<T>(dn_uniform(key, i) < p ? 0.0f : dn_get(x[o]) * keep);
}
DN_STORAGE_KERNELS(dropout, (Buf<T> x, u64 stride, int n, u64 len, float p, float keep, u64 key),
                   (x, stride, n, len, p, keep, key))

// torch.optim.SGD: d = g + wd p; m = mu m + d; p -= lr (nesterov ? d + mu m : m), with
// hp = {lr, mu, wd, nesterov (0 or 1)} read from the arena (a recorded step follows changes);
// nothing when skip[0] is not zero (a loss scaler's `found`); flag[0] = 1 when an updated
// value is not finite (every writer stores the same value).
extern "C" __global__ void sgd(Buf<float> params, Buf<const float> grads, Buf<float> momentum, u64 len,
                               Buf<const float> hp, Buf<const float> skip, Buf<float> flag) {
    const u64 i = dn_index();
    if (i >= len || skip[0] != 0.0f) return;
    const float lr = hp[0], mu = hp[1], weight_decay = hp[2];
    const bool nesterov = hp[3] != 0.0f;
    const float p = params[i], d = grads[i] + weight_decay * p;
    const float m = mu * momentum[i] + d;
    const float q = p - lr * (nesterov ? d + mu * m : m);
    momentum[i] = m;
    params[i] = q;
    if (!isfinite(q) || !isfinite(m)) flag[0] = 1.0f;
}

// fp16 loss scaling as GradScaler does it (LossScale in src/backend/mod.rs): a scaler is
// {found, scale, good steps} in the arena, so a recorded step follows it.

// g *= scale: the gradient of the scaled loss.
extern "C" __global__ void scale_loss_grad(Buf<float> g, u64 len, Buf<const float> scaler) {
    const u64 i = dn_index();
    if (i >= len) return;
    g[i] = g[i] * scaler[1];
}

// found = 0, before unscale_grads.
extern "C" __global__ void clear_found(Buf<float> scaler) {
    if (dn_index() == 0) scaler[0] = 0.0f;
}

// grads *= 1 / scale (the reciprocal in double, as GradScaler takes it); found = 1 when a
// gradient is not finite (every writer stores the same value).
extern "C" __global__ void unscale_grads(Buf<float> grads, u64 len, Buf<float> scaler) {
    const u64 i = dn_index();
    if (i >= len) return;
    const float g = grads[i], inv = (float)(1.0 / (double)scaler[1]);
    if (!isfinite(g)) scaler[0] = 1.0f;
    grads[i] = g * inv;
}

// found: scale halved, good steps 0; else good steps + 1, and at `interval` the scale doubled
// (kept when the double is not finite) and good steps 0. found is left.
extern "C" __global__ void update_scale(Buf<float> scaler, int interval) {
    if (dn_index() != 0) return;
    const float scale = scaler[1], good = scaler[2] + 1.0f, grown = scale * 2.0f;
    if (scaler[0] != 0.0f) {
        scaler[1] = scale * 0.5f;
        scaler[2] = 0.0f;
    } else if (good == (float)interval) {
        scaler[1] = isfinite(grown) ? grown : scale;
        scaler[2] = 0.0f;
    } else {
        scaler[2] = good;
    }
}
