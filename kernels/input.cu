// The input batch on the device: stored uint8 images cut through their random crop windows,
// mirrored, and normalized, straight into the network's image buffer (the host copies 1 byte
// per value instead of 4, and does no per-pixel work).
#include "dn.cuh"

// dst[img, c, y, x] = table[c * 256 + v], v the byte of stored image img at the window pixel
// (y, x) (window at (top, left) of the image zero-padded by `pad`, mirrored when flip), 0 in
// the padding. `bytes` packs n images of 3 x h x w bytes 4 per word, little-endian;
// crops[3 img ..] = top, left, flip.
extern "C" __global__ void augment(Buf<const unsigned> bytes, Buf<const int> crops, Buf<const float> table,
                                   Buf<float> dst, int n, int h, int w, int pad) {
    const u64 plane = (u64)h * w, per = 3 * plane, i = dn_index();
    if (i >= (u64)n * per) return;
    const u64 img = i / per, r = i - img * per, c = r / plane, p = r - c * plane;
    const int y = (int)(p / w), x = (int)(p - (u64)y * w);
    const int top = crops[3 * img], left = crops[3 * img + 1], flip = crops[3 * img + 2];
    const int row = y + top - pad, col = (flip ? w - 1 - x : x) + left - pad;
    unsigned v = 0;
    if (row >= 0 && row < h && col >= 0 && col < w) {
        const u64 b = img * per + c * plane + (u64)row * w + col;
        v = (bytes[b / 4] >> (8 * (b % 4))) & 0xffu;
    }
    dst[i] = table[c * 256 + v];
}
