// The classifier head: linear layer forward and backward, softmax cross-entropy with top-1
// count. Tiny ([batch, classes]); dot products in f64 like the CPU reference, one thread per
// output, reductions over the batch in one block, so results are reproducible.
#include "dn.cuh"

// sum over t < len of a[t * a_step] * b[t * b_step], in f64.
template <class A, class B>
__device__ double dn_dot(A a, int a_step, B b, int b_step, int len) {
    double s = 0.0;
    for (int t = 0; t < len; t++) s += (double)a[t * a_step] * (double)b[t * b_step];
    return s;
}

// y[i, k] = x[i, :] . w[k, :] + b[k].
extern "C" __global__ void linear(Buf<const float> x, Buf<const float> w, Buf<const float> b, Buf<float> y, int n, int cin,
                       int cout) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n * cout) return;
    const int i = o / cout, k = o - i * cout;
    y[o] = (float)(dn_dot(x + i * cin, 1, w + k * cin, 1, cin) + (double)b[k]);
}

// gw[k, j] = sum_i gy[i, k] x[i, j] for o < cout * cin; gb[k] = sum_i gy[i, k] after them.
extern "C" __global__ void linear_backward_params(Buf<const float> x, Buf<const float> gy, Buf<float> gw, Buf<float> gb, int n,
                                       int cin, int cout) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o < cout * cin) {
        const int k = o / cin, j = o - k * cin;
        gw[o] = (float)dn_dot(gy + k, cout, x + j, cin, n);
    } else if (o < cout * cin + cout) {
        const int k = o - cout * cin;
        double s = 0.0;
        for (int i = 0; i < n; i++) s += gy[i * cout + k];
        gb[k] = (float)s;
    }
}

// gx[i, j] = sum_k gy[i, k] w[k, j].
extern "C" __global__ void linear_backward_data(Buf<const float> w, Buf<const float> gy, Buf<float> gx, int n, int cin,
                                     int cout) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n * cin) return;
    const int i = o / cin, j = o - i * cin;
    gx[o] = (float)dn_dot(gy + i * cout, 1, w + j, cin, cout);
}

// One block: row i (thread i, i + blockDim.x, ...) gets softmax, loss and argmax; glogits =
// (p - onehot) / total; out[0] = the loss summed over the rows / total (total = n, or a
// data-parallel job's global batch), out[1] = rows whose first maximum is the label.
// blockDim.x is a power of two and `s` holds 2 * blockDim.x doubles.
extern "C" __global__ void softmax_xent(Buf<const float> logits, Buf<const unsigned> labels, Buf<float> out,
                             Buf<float> glogits, int n, int k, int total) {
    DN_SHARED(double, s);
    double loss = 0.0, correct = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int label = (int)labels[i];
        float mx = -INFINITY;
        int arg = 0;
        for (int j = 0; j < k; j++) {
            const float v = logits[i * k + j];
            if (v > mx) {
                mx = v;
                arg = j;
            }
        }
        double sum = 0.0;
        for (int j = 0; j < k; j++) sum += exp((double)(logits[i * k + j] - mx));
        loss += log(sum) + (double)mx - (double)logits[i * k + label];
        correct += arg == label ? 1.0 : 0.0;
        for (int j = 0; j < k; j++) {
            const double p = exp((double)(logits[i * k + j] - mx)) / sum;
            glogits[i * k + j] = (float)((p - (j == label ? 1.0 : 0.0)) / (double)total);
        }
    }
    block_sum2(s, loss, correct);
    if (threadIdx.x == 0) {
        out[0] = (float)(loss / (double)total);
        out[1] = (float)correct;
    }
}
