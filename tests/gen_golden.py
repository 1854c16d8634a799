"""Generate tests/data/golden.safetensors from the reference PyTorch DenseNet.

Run by hand (CI never runs it), with PyTorch and safetensors installed:
    pip install torch safetensors numpy && python tests/gen_golden.py

For each small network (prefix `bc` and `basic`) the file holds the input
batch, the initial state dict, and the results of one SGD training step
computed in float64. Float tensors are stored as float32, integer tensors as
int64. Keys, with NAME a state-dict entry or a parameter name:
    {net}.input             [8,3,32,32]
    {net}.labels            [8] int64
    {net}.init.NAME         every state-dict entry before the step
    {net}.logits            [8,classes]
    {net}.loss              [1] mean cross-entropy
    {net}.grad.NAME         gradient of the loss (no weight decay) per parameter
    {net}.after.NAME        every state-dict entry after the step
    {net}.momentum.NAME     SGD momentum buffer per parameter after the step
    {net}.eval_logits       logits of the input in eval mode after the step
    {net}.eval_loss         [1] their mean cross-entropy
Metadata: `{net}.config` (JSON) and `generator`.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benches"))
from torch_densenet import DenseNet3  # noqa: E402

OUT_PATH = os.path.join(HERE, "data", "golden.safetensors")
BATCH = 8
CLASSES = 10
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4

# "chunked" and "chunked_basic" have layers of more input channels than 2k, so the engine's
# BN1-ReLU backward runs in several chunks of channels (one of them partial).
NETS = {
    "bc": dict(seed=1234, depth=16, growth=4, reduction=0.5, bottleneck=True),
    "basic": dict(seed=5678, depth=13, growth=3, reduction=0.5, bottleneck=False),
    "chunked": dict(seed=4321, depth=34, growth=2, reduction=0.5, bottleneck=True),
    "chunked_basic": dict(seed=8765, depth=22, growth=2, reduction=0.5, bottleneck=False),
}


def stored(t):
    """Detached contiguous copy: floats as float32, integers as int64."""
    t = t.detach()
    t = t.float() if t.is_floating_point() else t.long()
    return t.contiguous().clone()


def state_tensors(model, prefix):
    return {f"{prefix}.{k}": stored(v) for k, v in model.state_dict().items()}


def generate(net, cfg):
    torch.manual_seed(cfg["seed"])
    model = DenseNet3(cfg["depth"], CLASSES, growth_rate=cfg["growth"],
                      reduction=cfg["reduction"], bottleneck=cfg["bottleneck"],
                      dropRate=0.0).double()
    model.train()
    # Drawn in float32 (like the weights) so the stored float32 values are
    # exactly the float64 values the step was computed from.
    images = torch.randn(BATCH, 3, 32, 32).double()
    labels = torch.randint(0, CLASSES, (BATCH,))

    out = {f"{net}.input": stored(images), f"{net}.labels": stored(labels)}
    out.update(state_tensors(model, f"{net}.init"))

    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                nesterov=True, weight_decay=WEIGHT_DECAY)
    optimizer.zero_grad()
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    # Gradients are captured before step(), which adds weight decay to its
    # own copy only; p.grad stays the gradient of the loss.
    grads = {f"{net}.grad.{k}": stored(p.grad) for k, p in model.named_parameters()}
    optimizer.step()

    out[f"{net}.logits"] = stored(logits)
    out[f"{net}.loss"] = stored(loss.reshape(1))
    out.update(grads)
    out.update(state_tensors(model, f"{net}.after"))
    for k, p in model.named_parameters():
        out[f"{net}.momentum.{k}"] = stored(optimizer.state[p]["momentum_buffer"])
    # Evaluation mode after the step: BN with the updated running statistics.
    model.eval()
    with torch.no_grad():
        eval_logits = model(images)
    out[f"{net}.eval_logits"] = stored(eval_logits)
    out[f"{net}.eval_loss"] = stored(F.cross_entropy(eval_logits, labels).reshape(1))

    config = dict(depth=cfg["depth"], growth=cfg["growth"],
                  bottleneck=cfg["bottleneck"], reduction=cfg["reduction"],
                  classes=CLASSES, batch=BATCH)
    return out, json.dumps(config)


def verify(path):
    """Reload the file and check a few invariants of the stored step."""
    t = load_file(path)
    print(f"{path}: {len(t)} tensors, {os.path.getsize(path)} bytes")
    for net in NETS:
        for name in ("conv1.weight", "fc.weight", "block1.layer.0.bn1.weight"):
            p = t[f"{net}.init.{name}"].double()
            g = t[f"{net}.grad.{name}"].double()
            # torch SGD, Nesterov, first step: buf = g + wd*p; p -= lr*(d + m*buf).
            d = g + WEIGHT_DECAY * p
            buf = d
            expected = p - LR * (d + MOMENTUM * buf)
            err_p = (expected - t[f"{net}.after.{name}"].double()).abs().max().item()
            err_b = (buf - t[f"{net}.momentum.{name}"].double()).abs().max().item()
            assert err_p < 1e-6 and err_b < 1e-6, (net, name, err_p, err_b)
        nbt = t[f"{net}.after.block1.layer.0.bn1.num_batches_tracked"]
        assert nbt.dtype == torch.int64 and nbt.item() == 1
        assert t[f"{net}.labels"].dtype == torch.int64
        logits = t[f"{net}.logits"].double()
        loss = F.cross_entropy(logits, t[f"{net}.labels"]).item()
        assert abs(loss - t[f"{net}.loss"].item()) < 1e-5, (net, loss)
        print(f"{net}: loss {t[f'{net}.loss'].item():.6f}, invariants ok")


def main():
    tensors = {}
    metadata = {"generator": f"tests/gen_golden.py, torch {torch.__version__}, "
                             "float64 compute stored as float32"}
    for net, cfg in NETS.items():
        out, config = generate(net, cfg)
        tensors.update(out)
        metadata[f"{net}.config"] = config
    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    save_file(tensors, OUT_PATH, metadata=metadata)
    verify(OUT_PATH)


if __name__ == "__main__":
    main()
