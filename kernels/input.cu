// The input batch on the device: stored uint8 images cut through their random crop windows,
// mirrored, normalized and upsampled, straight into the network's image buffer (the host copies
// 1 byte per stored value instead of 4 per input value, and does no per-pixel work).
#include "dn.cuh"

#define DN_CHANNELS 3    // R, G and B planes of an input image (input::CHANNELS)
#define DN_CROP_WORDS 3  // top, left and flip of an image's crop window (the backend's CROP_WORDS)
#define DN_LEVELS 256    // byte values, each with an entry per channel in the normalization table

// dst[img, c, y, x] = table[c * DN_LEVELS + v], v the byte of stored image img at the window pixel
// (y / scale, x / scale) (window at (top, left) of the image zero-padded by `pad`, mirrored when
// flip), 0 in the padding: each window pixel becomes a scale x scale square of dst, which holds
// n images of 3 x scale h x scale w. `bytes` packs n images of 3 x h x w bytes 4 per word,
// little-endian; crops[DN_CROP_WORDS img ..] = top, left, flip. dst holds storage type T.
template <class T>
__device__ void augment(Buf<const unsigned> bytes, Buf<const int> crops, Buf<const float> table, Buf<T> dst, int n,
                        int h, int w, int scale, int pad) {
    const int ow = w * scale;
    const u64 plane = (u64)h * w, out_plane = plane * scale * scale, per = DN_CHANNELS * out_plane;
    const u64 i = dn_index();
    if (i >= (u64)n * per) return;
    const u64 img = i / per, r = i - img * per, c = r / out_plane, p = r - c * out_plane;
    const int oy = (int)(p / ow), y = oy / scale, x = (int)(p - (u64)oy * ow) / scale;
    const Buf<const int> crop = crops + DN_CROP_WORDS * img;
    const int top = crop[0], left = crop[1], flip = crop[2];
    const int row = y + top - pad, col = (flip ? w - 1 - x : x) + left - pad;
    unsigned v = 0;
    if (row >= 0 && row < h && col >= 0 && col < w) {
        const u64 b = (img * DN_CHANNELS + c) * plane + (u64)row * w + col;
        v = (bytes[b / 4] >> (8 * (b % 4))) & 0xffu;
    }
    dst[i] = dn_put<T>(table[c * DN_LEVELS + v]);
}
DN_STORAGE_KERNELS(augment,
                   (Buf<const unsigned> bytes, Buf<const int> crops, Buf<const float> table, Buf<T> dst, int n, int h,
                    int w, int scale, int pad),
                   (bytes, crops, table, dst, n, h, w, scale, pad))
