"""Generate tests/data/golden16.safetensors: one training step of the golden networks with the
engine's 16-bit rounding points emulated in PyTorch (docs/precision.md).

Run by hand (CI never runs it), with PyTorch and safetensors installed, after
tests/gen_golden.py (whose committed file gives the input, labels and initial state):
    pip install torch safetensors numpy && python tests/gen_golden16.py

The step is the reference DenseNet's, computed in float64 as a functional forward, with every
tensor the engine stores in 16 bits rounded to bfloat16 or float16 where the engine rounds it
(an autograd function that rounds the value in forward and its gradient in backward):

- the input batch, the stem's output, every layer's new channels;
- a layer's BN-ReLU outputs (rule 4: the fused ones too) and its bottleneck (the 1x1 output);
- a transition's BN-ReLU output, its pooled input (the engine pools before the 1x1
  convolution, which commutes with it) and its output;
- the head's BN-ReLU output (its pooled features, the logits and the loss stay float).

Gradients are rounded once per stored tensor; the engine rounds a block's gradient after each
consumer adds to it, so the gradients agree within a few 16-bit units, not exactly (the Rust
test states the tolerances). In fp16 the loss is scaled by GradScaler's initial 2^16 before
backward and the gradients unscaled after, as the engine does.

Keys, with P in {bf16, fp16} and NAME a state-dict entry or a parameter name:
    {net}.{P}.logits, .loss, .grad.NAME, .after.NAME, .momentum.NAME, .eval_logits, .eval_loss
as tests/gen_golden.py defines them. Metadata: `generator`.
"""

import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "data", "golden.safetensors")
OUT_PATH = os.path.join(HERE, "data", "golden16.safetensors")
NETS = ("bc", "basic")
PRECISIONS = {"bf16": (torch.bfloat16, 1.0), "fp16": (torch.float16, 65536.0)}
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
BN_MOMENTUM, EPS = 0.1, 1e-5


class Round(torch.autograd.Function):
    """The value rounded to `dtype` in forward, its gradient rounded in backward."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).to(g.dtype), None


def blocks_of(params):
    """(layers per block, whether they are bottleneck layers) from the state-dict names."""
    layers = 1 + max(int(k.split(".")[2]) for k in params if k.startswith("block1.layer."))
    return layers, "block1.layer.0.bn2.weight" in params


def forward(w, running, x, r, train):
    """The network on `x` with weights `w` and running statistics `running` (updated in place
    when training), rounding with `r` where the engine stores 16 bits."""
    layers, bottleneck = blocks_of(w)

    def bn_relu(t, name):
        y = F.batch_norm(t, running[f"{name}.running_mean"], running[f"{name}.running_var"],
                         w[f"{name}.weight"], w[f"{name}.bias"], train, BN_MOMENTUM, EPS)
        return r(F.relu(y))

    out = r(F.conv2d(r(x), w["conv1.weight"], padding=1))
    for b in (1, 2, 3):
        for i in range(layers):
            p = f"block{b}.layer.{i}"
            a = bn_relu(out, f"{p}.bn1")
            if bottleneck:
                z = r(F.conv2d(a, w[f"{p}.conv1.weight"]))
                new = r(F.conv2d(bn_relu(z, f"{p}.bn2"), w[f"{p}.conv2.weight"], padding=1))
            else:
                new = r(F.conv2d(a, w[f"{p}.conv1.weight"], padding=1))
            out = torch.cat([out, new], 1)
        if b < 3:
            pooled = r(F.avg_pool2d(bn_relu(out, f"trans{b}.bn1"), 2))
            out = r(F.conv2d(pooled, w[f"trans{b}.conv1.weight"]))
    a = bn_relu(out, "bn1")
    pooled = F.avg_pool2d(a, a.shape[-1]).flatten(1)
    return F.linear(pooled, w["fc.weight"], w["fc.bias"])


def step(golden, net, dtype, scale):
    init = {k[len(f"{net}.init."):]: v.double() for k, v in golden.items() if k.startswith(f"{net}.init.")}
    running = {k: v.clone() for k, v in init.items() if k.endswith(("running_mean", "running_var"))}
    w = {k: v.clone().requires_grad_() for k, v in init.items()
         if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    x, labels = golden[f"{net}.input"].double(), golden[f"{net}.labels"]
    r = lambda t: Round.apply(t, dtype)  # noqa: E731
    logits = forward(w, running, x, r, True)
    loss = F.cross_entropy(logits, labels)
    (loss * scale).backward()
    out = {"logits": logits, "loss": loss.reshape(1)}
    after, momentum = {}, {}
    with torch.no_grad():
        for k, p in w.items():
            g = p.grad / scale
            assert torch.isfinite(g).all(), (net, k, "overflow: the engine would skip this step")
            out[f"grad.{k}"] = g
            # torch.optim.SGD, Nesterov, first step: buf = d; p -= lr (d + m buf).
            d = g + WEIGHT_DECAY * p
            momentum[k] = d
            after[k] = p - LR * (d + MOMENTUM * d)
        eval_logits = forward(after, running, x, r, False)
    out.update({f"after.{k}": v for k, v in {**after, **running}.items()})
    out.update({f"momentum.{k}": v for k, v in momentum.items()})
    out["eval_logits"] = eval_logits
    out["eval_loss"] = F.cross_entropy(eval_logits, labels).reshape(1)
    return out


def main():
    golden = load_file(GOLDEN)
    tensors = {}
    for net in NETS:
        for name, (dtype, scale) in PRECISIONS.items():
            for k, v in step(golden, net, dtype, scale).items():
                tensors[f"{net}.{name}.{k}"] = v.detach().float().contiguous()
            loss = tensors[f"{net}.{name}.loss"].item()
            print(f"{net} {name}: loss {loss:.6f} (float: {golden[f'{net}.loss'].item():.6f})")
    metadata = {"generator": f"tests/gen_golden16.py, torch {torch.__version__}, float64 compute with the "
                             "engine's 16-bit rounding points, stored as float32"}
    save_file(tensors, OUT_PATH, metadata=metadata)
    print(f"{OUT_PATH}: {len(tensors)} tensors, {os.path.getsize(OUT_PATH)} bytes")


if __name__ == "__main__":
    main()
