"""Write scikit-learn's handwritten digits as a CIFAR-10 binary data set: a small real data set
that needs no download (it ships inside scikit-learn), for learning comparisons such as the
16-bit storage one in BENCHMARKS.md.

    pip install scikit-learn && python benches/digits_as_cifar.py OUT_DIR

The 1,797 8x8 images (16 grey levels) are scaled to 0..255, upsampled 4x (nearest) to 32x32
and repeated in the three channels. A fixed shuffle puts 300 in `test_batch.bin` and the other
1,497 in the training files (1,493 in `data_batch_1.bin`, one in each of the other four: the
loader reads all five), under OUT_DIR/cifar-10-batches-bin/. Train with `--no-augment`
(mirroring a digit changes it).
"""

import os
import sys

import numpy as np
from sklearn.datasets import load_digits

TEST = 300


def records(images, labels):
    """CIFAR-10 records: a label byte, then 3 x 32 x 32 pixel bytes."""
    pixels = np.clip(np.rint(images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    pixels = pixels.repeat(4, axis=1).repeat(4, axis=2)
    out = np.empty((len(labels), 1 + 3 * 32 * 32), dtype=np.uint8)
    out[:, 0] = labels
    out[:, 1:] = np.repeat(pixels[:, None], 3, axis=1).reshape(len(labels), -1)
    return out.tobytes()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images, labels = digits.images[order], digits.target[order]
    test = slice(0, TEST)
    root = os.path.join(sys.argv[1], "cifar-10-batches-bin")
    os.makedirs(root, exist_ok=True)
    # The first training file holds all but four training images, the others one each.
    n = len(labels) - TEST
    cuts = [TEST, TEST + n - 4, TEST + n - 3, TEST + n - 2, TEST + n - 1, TEST + n]
    for i in range(5):
        part = slice(cuts[i], cuts[i + 1])
        with open(os.path.join(root, f"data_batch_{i + 1}.bin"), "wb") as f:
            f.write(records(images[part], labels[part]))
    with open(os.path.join(root, "test_batch.bin"), "wb") as f:
        f.write(records(images[test], labels[test]))
    print(f"{root}: {n} training and {TEST} test images of {len(set(labels))} classes")


if __name__ == "__main__":
    main()
