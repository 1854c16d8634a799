// Batch norm: per-channel batch statistics (computed once per channel group and reused by every
// later layer's BN), the running-statistics update, BN-apply + ReLU, and the fused backward
// (ReLU mask recomputed from x, BN backward, accumulation into the block gradient buffer).
// One block per channel for the reductions; sums are per-thread f32 partials added in f64.
// Views hold any storage type T (DN_STORAGE_KERNELS); statistics and parameters are f32.
#include "dn.cuh"

// Channel blockIdx.x of a view: mean and biased variance over n images of hw pixels, as
// sums of x - shift and (x - shift)^2 with shift the channel's first value.
template <class T>
__device__ void bn_stats(Buf<const T> x, int n, int hw, u64 stride, Buf<float> mean, Buf<float> var) {
    DN_SHARED(double, sums);
    const int c = blockIdx.x;
    const u64 base = (u64)c * hw, count = (u64)n * hw;
    const float shift = dn_get(x[base]);
    float s1 = 0.0f, s2 = 0.0f;
    for (u64 j = threadIdx.x; j < count; j += blockDim.x) {
        const u64 img = j / hw;
        const float d = dn_get(x[base + img * stride + (j - img * hw)]) - shift;
        s1 += d;
        s2 += d * d;
    }
    double a = s1, b = s2;
    block_sum2(sums, a, b);
    if (threadIdx.x == 0) {
        const double m = a / (double)count;
        mean[c] = (float)((double)shift + m);
        var[c] = (float)fmax(b / (double)count - m * m, 0.0);
    }
}
DN_STORAGE_KERNELS(bn_stats, (Buf<const T> x, int n, int hw, u64 stride, Buf<float> mean, Buf<float> var),
                   (x, n, hw, stride, mean, var))

// running = (1 - m) running + m batch, the variance scaled by `unbias` = count / (count - 1);
// flag[0] = 1 when an updated value is not finite (every writer stores the same value).
extern "C" __global__ void bn_update_running(Buf<const float> mean, Buf<const float> var, Buf<float> running_mean,
                                  Buf<float> running_var, int c, float unbias, float momentum, Buf<float> flag) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < c) {
        const float m = (1.0f - momentum) * running_mean[i] + momentum * mean[i];
        const float v = (1.0f - momentum) * running_var[i] + momentum * var[i] * unbias;
        running_mean[i] = m;
        running_var[i] = v;
        if (!isfinite(m) || !isfinite(v)) flag[0] = 1.0f;
    }
}

// y = relu(x * scale + shift) over a view of n images x c channels x hw pixels (flattened).
template <class T>
__device__ void bn_relu(Buf<const T> x, u64 x_stride, Buf<T> y, u64 y_stride, int n, int c, int hw,
                        Buf<const float> mean, Buf<const float> var, Buf<const float> gamma,
                        Buf<const float> beta) {
    const u64 i = dn_index(), chw = (u64)c * hw;
    if (i >= (u64)n * chw) return;
    const u64 img = i / chw, r = i - img * chw;
    const int ch = (int)(r / hw);
    float scale, shift, inv_std;
    bn_affine(mean, var, gamma, beta, ch, scale, shift, inv_std);
    y[img * y_stride + r] = dn_put<T>(dn_bn_relu(dn_get(x[img * x_stride + r]), scale, shift));
}
DN_STORAGE_KERNELS(bn_relu,
                   (Buf<const T> x, u64 x_stride, Buf<T> y, u64 y_stride, int n, int c, int hw, Buf<const float> mean,
                    Buf<const float> var, Buf<const float> gamma, Buf<const float> beta),
                   (x, x_stride, y, y_stride, n, c, hw, mean, var, gamma, beta))

// Backward of bn_relu for channel blockIdx.x with batch statistics: gm = g where the forward
// output was positive; dbeta = sum gm, dgamma = sum gm * xhat; dx = gamma inv_std (gm -
// mean(gm) - xhat mean(gm xhat)), written or added to dx. dx may be g itself (in place).
// mode 0: the sums into dgamma and dbeta, then dx; 1: the sums into dgamma, dbeta and `sums`
// (c sums of gm * xhat then c of gm: a data-parallel rank's, all-reduced before mode 2), no dx;
// 2: dx only, from the whole batch's sums in `sums` over `total` values.
template <class T>
__device__ void bn_relu_backward(Buf<const T> g, u64 g_stride, Buf<const T> x, u64 x_stride, Buf<T> dx,
                                 u64 dx_stride, int n, int hw, Buf<const float> mean, Buf<const float> var,
                                 Buf<const float> gamma, Buf<const float> beta, Buf<float> dgamma,
                                 Buf<float> dbeta, Buf<float> sums, int accumulate, int mode, u64 total) {
    DN_SHARED(double, partial);
    const int c = blockIdx.x, channels = gridDim.x;
    const u64 base = (u64)c * hw, count = mode == 2 ? total : (u64)n * hw;
    float scale, shift, inv_std;
    bn_affine(mean, var, gamma, beta, c, scale, shift, inv_std);
    const float mu = mean[c];
    double a, b;
    if (mode == 2) {
        a = sums[channels + c];
        b = sums[c];
    } else {
        float s1 = 0.0f, s2 = 0.0f;
        for (u64 j = threadIdx.x; j < (u64)n * hw; j += blockDim.x) {
            const u64 img = j / hw, p = base + (j - img * hw);
            const float xv = dn_get(x[img * x_stride + p]);
            const float gm = xv * scale + shift > 0.0f ? dn_get(g[img * g_stride + p]) : 0.0f;
            s1 += gm;
            s2 += gm * ((xv - mu) * inv_std);
        }
        a = s1;
        b = s2;
        block_sum2(partial, a, b);
        if (threadIdx.x == 0) {
            dbeta[c] = (float)a;
            dgamma[c] = (float)b;
            if (mode == 1) {
                sums[c] = (float)b;
                sums[channels + c] = (float)a;
            }
        }
        if (mode == 1) return;
    }
    const float mg = (float)(a / (double)count), mgx = (float)(b / (double)count), k = gamma[c] * inv_std;
    for (u64 j = threadIdx.x; j < (u64)n * hw; j += blockDim.x) {
        const u64 img = j / hw, p = base + (j - img * hw);
        const float xv = dn_get(x[img * x_stride + p]);
        const float gm = xv * scale + shift > 0.0f ? dn_get(g[img * g_stride + p]) : 0.0f;
        const float v = k * (gm - mg - (xv - mu) * inv_std * mgx);
        const u64 o = img * dx_stride + p;
        dx[o] = dn_put<T>(accumulate ? dn_get(dx[o]) + v : v);
    }
}
DN_STORAGE_KERNELS(bn_relu_backward,
                   (Buf<const T> g, u64 g_stride, Buf<const T> x, u64 x_stride, Buf<T> dx, u64 dx_stride, int n,
                    int hw, Buf<const float> mean, Buf<const float> var, Buf<const float> gamma,
                    Buf<const float> beta, Buf<float> dgamma, Buf<float> dbeta, Buf<float> sums, int accumulate,
                    int mode, u64 total),
                   (g, g_stride, x, x_stride, dx, dx_stride, n, hw, mean, var, gamma, beta, dgamma, dbeta, sums,
                    accumulate, mode, total))

// A data-parallel job's batch statistics of channel i from every rank's: parts holds, rank after
// rank, c means then c biased variances, each rank's over its shard of `batch` images of hw
// pixels (the first batch % world shards one image longer, as comm::shard cuts them); the
// whole batch's mean and biased variance, combined in double in rank order.
extern "C" __global__ void bn_stats_combine(Buf<const float> parts, int c, int world, int batch, int hw,
                                            Buf<float> mean, Buf<float> var) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= c) return;
    const int per = batch / world, extra = batch % world;
    const double total = (double)batch * hw;
    double m = 0.0, v = 0.0;
    for (int r = 0; r < world; r++) m += (double)(per + (r < extra)) * hw * (double)parts[(u64)r * 2 * c + i];
    m /= total;
    for (int r = 0; r < world; r++) {
        const double d = (double)parts[(u64)r * 2 * c + i] - m;
        v += (double)(per + (r < extra)) * hw * ((double)parts[(u64)r * 2 * c + c + i] + d * d);
    }
    mean[i] = (float)m;
    var[i] = (float)(v / total);
}
