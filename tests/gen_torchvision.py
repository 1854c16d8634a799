"""Generate tests/data/torchvision.safetensors from torchvision's DenseNet-121 and -169.

Run by hand (CI never runs it), with torch, torchvision, numpy and safetensors installed:
    pip install torch torchvision safetensors numpy && python tests/gen_torchvision.py

Every floating tensor of the state dict, the input batch and the labels come from a formula
(below) on the counter-based generator of src/rng.rs, computed in float32 exactly as the Rust
test does, so the test regenerates the 30+ MB of weights instead of reading them. The model
computes in float64 from those float32 values; results are stored as float32. The models are
torchvision.models.densenet121/169(num_classes=10, drop_rate=0); the step is one SGD step (lr
0.1, momentum 0.9, Nesterov, weight decay 1e-4) on a batch of 2 images of 64x96 in train mode.

Formula, with mix64, derive and uniform(key, j) (24-bit, in [0, 1)) those of src/rng.rs and
fnv(name) the 64-bit FNV-1a hash of the tensor's state-dict name:
    element j of tensor `name` of shape s = lo + span * uniform(derive(derive(seed, 1), fnv(name)), j)
    in float32 (a product, then a sum), with (lo, span) by the tensor's rank and name:
      rank >= 2 (conv, linear): lo = -b, span = 2b, b = sqrt(g / fan_in), fan_in = prod(s[1:]),
                                g = 6 for convolutions (He), 3 for the classifier (var 1/fan_in)
      rank 1, `.weight` or `.running_var`: lo = 0.5, span = 1 (U[0.5, 1.5))
      rank 1, `.bias` or `.running_mean`:  lo = -0.2, span = 0.4 (U[-0.2, 0.2))
    b, lo and span computed in float64, then rounded to float32.
    image element i ([batch, 3, h, w], C order) = -2 + 4 * uniform(derive(seed, 2), i)
    label i = derive(derive(seed, 3), i) % classes
    sampled element s of tensor `name` (length L) = derive(derive(derive(seed, 4), fnv(name)), s) % L

Keys, with {net} `densenet121` or `densenet169`, P the parameters in state-dict order and R the
running statistics (running_mean, running_var) in state-dict order:
    {net}.eval_logits        [batch, classes] eval mode, before the step
    {net}.eval_loss          [1]
    {net}.logits             [batch, classes] train mode, the step's forward pass
    {net}.loss               [1] mean cross-entropy
    {net}.{q}.norm           [P] L2 norm per parameter, q = grad (of the loss, no weight
                             decay), after (the parameter after the step), momentum (the SGD
                             buffer after the step); [R] per running statistic after the step,
                             q = running (too many to store whole: 240k values)
    {net}.{q}.sample         [P or R, SAMPLES] the sampled elements of each
Metadata: `{net}.config` (JSON: torchvision model, classes, batch, height, width, seed, samples),
`{net}.tensors` (JSON: [name, shape] of every floating state-dict entry, in order), `formula`
and `generator` (versions).
"""

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_PATH = os.path.join(HERE, "data", "torchvision.safetensors")
BATCH, HEIGHT, WIDTH, CLASSES, SAMPLES = 2, 64, 96, 10, 16
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
NETS = {"densenet121": 121, "densenet169": 169}  # torchvision model -> seed

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix64(z):
    """SplitMix64 finalizer on a Python int or a numpy uint64 array (wrapping)."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def derive(key, tag):
    return mix64(key ^ mix64((tag + GOLDEN) & M64))


def uniform(key, n):
    """uniform(key, j) for j < n, float32."""
    j = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = mix64(np.uint64(key) + j * np.uint64(GOLDEN))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def fnv(name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def bounds(name, shape):
    """(lo, span) of the tensor's uniform distribution, float32."""
    if len(shape) >= 2:
        g = 6.0 if len(shape) == 4 else 3.0
        b = math.sqrt(g / math.prod(shape[1:]))
        return np.float32(-b), np.float32(2 * b)
    if name.endswith(".weight") or name.endswith(".running_var"):
        return np.float32(0.5), np.float32(1.0)
    assert name.endswith(".bias") or name.endswith(".running_mean"), name
    return np.float32(-0.2), np.float32(0.4)


def tensor_values(seed, name, shape):
    lo, span = bounds(name, shape)
    u = uniform(derive(derive(seed, 1), fnv(name)), math.prod(shape))
    return (lo + span * u).astype(np.float32).reshape(shape)


def sample_indices(seed, name, length):
    key = derive(derive(seed, 4), fnv(name))
    return [derive(key, s) % length for s in range(SAMPLES)]


def batch(seed):
    images = np.float32(-2) + np.float32(4) * uniform(derive(seed, 2), BATCH * 3 * HEIGHT * WIDTH)
    labels = [derive(derive(seed, 3), i) % CLASSES for i in range(BATCH)]
    return (torch.from_numpy(images.reshape(BATCH, 3, HEIGHT, WIDTH)).double(),
            torch.tensor(labels, dtype=torch.int64))


def f32(t):
    return t.detach().float().contiguous().clone()


def summary(seed, tensors):
    """(norms [T], samples [T, SAMPLES]) of (name, tensor) pairs."""
    norms, samples = [], []
    for name, t in tensors:
        v = t.detach().double().flatten()
        norms.append(v.norm().item())
        samples.append([v[i].item() for i in sample_indices(seed, name, v.numel())])
    return torch.tensor(norms).float(), torch.tensor(samples).float()


def generate(net, seed):
    model = getattr(torchvision.models, net)(num_classes=CLASSES, drop_rate=0).double()
    floats = [(k, list(v.shape)) for k, v in model.state_dict().items() if v.is_floating_point()]
    state = {k: torch.from_numpy(tensor_values(seed, k, s)).double() for k, s in floats}
    missing = model.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys and all(k.endswith("num_batches_tracked") for k in missing.missing_keys)
    images, labels = batch(seed)
    out = {}

    model.eval()
    with torch.no_grad():
        logits = model(images)
    out[f"{net}.eval_logits"] = f32(logits)
    out[f"{net}.eval_loss"] = f32(F.cross_entropy(logits, labels).reshape(1))
    print(f"{net}: eval logits rms {logits.pow(2).mean().sqrt().item():.3f}")

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                nesterov=True, weight_decay=WEIGHT_DECAY)
    optimizer.zero_grad()
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    print(f"{net}: train logits rms {logits.pow(2).mean().sqrt().item():.3f}, loss {loss.item():.4f}")
    # Before step(), which adds weight decay to its own copy only.
    grads = [(k, p.grad) for k, p in model.named_parameters()]
    out[f"{net}.grad.norm"], out[f"{net}.grad.sample"] = summary(seed, grads)
    optimizer.step()
    out[f"{net}.logits"] = f32(logits)
    out[f"{net}.loss"] = f32(loss.reshape(1))
    out[f"{net}.after.norm"], out[f"{net}.after.sample"] = summary(seed, model.named_parameters())
    momentum = [(k, optimizer.state[p]["momentum_buffer"]) for k, p in model.named_parameters()]
    out[f"{net}.momentum.norm"], out[f"{net}.momentum.sample"] = summary(seed, momentum)
    running = [(k, v) for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))]
    out[f"{net}.running.norm"], out[f"{net}.running.sample"] = summary(seed, running)

    config = dict(torchvision=net, classes=CLASSES, batch=BATCH, height=HEIGHT, width=WIDTH,
                  seed=seed, samples=SAMPLES)
    return out, {f"{net}.config": json.dumps(config), f"{net}.tensors": json.dumps(floats)}


def main():
    tensors = {}
    metadata = {
        "generator": f"tests/gen_torchvision.py, torch {torch.__version__}, torchvision "
                     f"{torchvision.__version__}, numpy {np.__version__}, float64 compute stored as float32",
        "formula": "uniform(derive(derive(seed, 1), fnv1a64(name)), j): see tests/gen_torchvision.py",
    }
    for net, seed in NETS.items():
        out, meta = generate(net, seed)
        tensors.update(out)
        metadata.update(meta)
    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    save_file(tensors, OUT_PATH, metadata=metadata)
    verify(OUT_PATH)


def verify(path):
    """Reload the file and check the stored step's invariants on the samples."""
    t = load_file(path)
    print(f"{path}: {len(t)} tensors, {os.path.getsize(path)} bytes")
    for net, seed in NETS.items():
        model = getattr(torchvision.models, net)(num_classes=CLASSES)
        params = [(k, list(p.shape)) for k, p in model.named_parameters()]
        for i, (name, shape) in enumerate(params):
            init = torch.from_numpy(tensor_values(seed, name, shape)).double().flatten()
            p = init[sample_indices(seed, name, init.numel())]
            g = t[f"{net}.grad.sample"][i].double()
            # torch SGD, Nesterov, first step: buf = g + wd*p; p -= lr*(d + m*buf).
            d = g + WEIGHT_DECAY * p
            err_p = (p - LR * (1 + MOMENTUM) * d - t[f"{net}.after.sample"][i].double()).abs().max().item()
            err_b = (d - t[f"{net}.momentum.sample"][i].double()).abs().max().item()
            assert err_p < 1e-6 and err_b < 1e-6, (net, name, err_p, err_b)
        _, labels = batch(seed)
        loss = F.cross_entropy(t[f"{net}.logits"].double(), labels).item()
        assert abs(loss - t[f"{net}.loss"].item()) < 1e-5, (net, loss)
        print(f"{net}: loss {t[f'{net}.loss'].item():.6f}, invariants ok")


if __name__ == "__main__":
    main()
