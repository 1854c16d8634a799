"""Reference PyTorch DenseNet (CIFAR), torchvision's ImageNet DenseNets, and benchmark workers.

The model follows the "DenseNet3" layout of andreasveit/densenet-pytorch:
conv1 -> block1 -> trans1 -> block2 -> trans2 -> block3 -> bn1 -> relu ->
avg_pool(8) -> fc. With ``checkpointed=True`` each bottleneck layer runs its
concat + bn1 + relu + conv1 under ``torch.utils.checkpoint`` (like
torchvision's memory-efficient DenseNet), so those activations are recomputed
in backward instead of stored. State-dict names are the same in both variants.

With ``--arch densenet121`` (or 169, 201, 161, 264) the benchmarks train
torchvision's ``torchvision.models.<arch>(num_classes=1000)`` instead, on
``--image-size`` inputs (default 224); mode ``checkpointed`` is its
``memory_efficient=True``. densenet264, which torchvision does not ship, is
built as its DenseNet(growth_rate=32, block_config=(6, 12, 64, 48),
num_init_features=64), the layout of the other presets.

Usage:
    python benches/torch_densenet.py params
    python benches/torch_densenet.py worker --mode naive|checkpointed \
        --depth 100 --growth 12 --batch 64 --threads 2 [--classes 10] \
        [--arch densenet121 [--image-size 224]]
    python benches/torch_densenet.py gpu --mode naive|checkpointed \
        [--depth 100 --growth 12 --batch 64 --steps 20 --warmup 5] \
        [--arch densenet121 [--image-size 224]] [--deterministic] [--compile]

The worker prints ``ready`` once set up, then reads commands from stdin, one
per line:
    step  run one training step, print its wall time in seconds
    rss   print the peak resident set size of this process in bytes
    quit  exit (end of input does the same)

``gpu`` times training steps on the GPU the way ``densenet bench --device cuda``
does (see run_gpu) and prints one JSON line; scripts/gpu-check.sh runs it.
"""

import argparse
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp


class BnReluConv(nn.Module):
    """bn1 -> relu -> conv1 (`kernel_size`, same padding) -> dropout: what every
    layer and transition starts with."""

    def __init__(self, in_planes, out_planes, kernel_size, dropRate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size,
                               stride=1, padding=kernel_size // 2, bias=False)
        self.droprate = dropRate

    def dropout(self, out):
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        return out

    def forward(self, x):
        return self.dropout(self.conv1(self.relu(self.bn1(x))))


class BasicBlock(BnReluConv):
    """bn -> relu -> 3x3 conv producing `out_planes` new channels."""

    def __init__(self, in_planes, out_planes, dropRate=0.0):
        super().__init__(in_planes, out_planes, 3, dropRate)

    def forward(self, x):
        return torch.cat([x, super().forward(x)], 1)


class BottleneckBlock(BnReluConv):
    """bn -> relu -> 1x1 conv (4k) -> bn -> relu -> 3x3 conv (k).

    In the checkpointed variant `forward` receives the list of all feature
    maps produced so far in the block and returns only the new feature map;
    the concatenation and the first bn/relu/conv are recomputed in backward.
    """

    def __init__(self, in_planes, out_planes, dropRate=0.0, checkpointed=False):
        inter_planes = out_planes * 4
        super().__init__(in_planes, inter_planes, 1, dropRate)
        self.bn2 = nn.BatchNorm2d(inter_planes)
        self.conv2 = nn.Conv2d(inter_planes, out_planes, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.checkpointed = checkpointed

    def _concat_first_half(self, *features):
        return super().forward(torch.cat(features, 1))

    def forward(self, x):
        if self.checkpointed:
            # Recomputation in backward updates bn1's running statistics a
            # second time, as in torchvision's memory-efficient DenseNet.
            out = cp.checkpoint(self._concat_first_half, *x, use_reentrant=False)
        else:
            out = super().forward(x)
        out = self.dropout(self.conv2(self.relu(self.bn2(out))))
        if self.checkpointed:
            return out
        return torch.cat([x, out], 1)


class TransitionBlock(BnReluConv):
    """bn -> relu -> 1x1 conv -> 2x2 average pool."""

    def __init__(self, in_planes, out_planes, dropRate=0.0):
        super().__init__(in_planes, out_planes, 1, dropRate)

    def forward(self, x):
        return F.avg_pool2d(super().forward(x), 2)


class DenseBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, growth_rate, block, dropRate=0.0,
                 checkpointed=False):
        super().__init__()
        # Only bottleneck layers support the list-of-features interface.
        self.checkpointed = checkpointed and block is BottleneckBlock
        layers = []
        for i in range(nb_layers):
            extra = {"checkpointed": True} if self.checkpointed else {}
            layers.append(block(in_planes + i * growth_rate, growth_rate,
                                dropRate, **extra))
        self.layer = nn.Sequential(*layers)

    def forward(self, x):
        if not self.checkpointed:
            return self.layer(x)
        features = [x]
        for layer in self.layer:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet3(nn.Module):
    def __init__(self, depth, num_classes, growth_rate=12, reduction=0.5,
                 bottleneck=True, dropRate=0.0, checkpointed=False):
        super().__init__()
        in_planes = 2 * growth_rate
        n = (depth - 4) // 3
        if bottleneck:
            n = n // 2
            block = BottleneckBlock
        else:
            block = BasicBlock

        self.conv1 = nn.Conv2d(3, in_planes, kernel_size=3, stride=1, padding=1,
                               bias=False)
        # block1, trans1, block2, trans2, block3: a transition after each dense
        # block but the last scales its channels by `reduction`.
        for i in (1, 2, 3):
            setattr(self, f"block{i}", DenseBlock(n, in_planes, growth_rate, block,
                                                  dropRate, checkpointed))
            in_planes = in_planes + n * growth_rate
            if i < 3:
                out_planes = int(math.floor(in_planes * reduction))
                setattr(self, f"trans{i}",
                        TransitionBlock(in_planes, out_planes, dropRate=dropRate))
                in_planes = out_planes
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(in_planes, num_classes)
        self.in_planes = in_planes

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x):
        out = self.conv1(x)
        out = self.trans1(self.block1(out))
        out = self.trans2(self.block2(out))
        out = self.block3(out)
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        out = out.view(-1, self.in_planes)
        return self.fc(out)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def print_params():
    bc = DenseNet3(100, 10, growth_rate=12, reduction=0.5, bottleneck=True)
    basic = DenseNet3(40, 10, growth_rate=12, reduction=1.0, bottleneck=False)
    print(f"DenseNet-BC-100-12 CIFAR-10: {count_params(bc)} (expected 769162)")
    print(f"DenseNet-40-12     CIFAR-10: {count_params(basic)} (expected 1059298)")


# torchvision's DenseNet arguments of the ImageNet presets it does not ship.
EXTRA_ARCHS = {"densenet264": {"growth_rate": 32, "block_config": (6, 12, 64, 48),
                               "num_init_features": 64}}


def build_model(args):
    """The benchmarked model: torchvision's `args.arch`, else the CIFAR DenseNet3."""
    checkpointed = args.mode == "checkpointed"
    if args.arch is None:
        return DenseNet3(args.depth, args.classes, growth_rate=args.growth, reduction=0.5,
                         bottleneck=True, checkpointed=checkpointed)
    import torchvision
    kwargs = {"num_classes": args.classes, "memory_efficient": checkpointed}
    if args.arch in EXTRA_ARCHS:
        return torchvision.models.DenseNet(**EXTRA_ARCHS[args.arch], **kwargs)
    return getattr(torchvision.models, args.arch)(**kwargs)


def training_setup(args, device):
    """The benchmarked model (seed 0, training mode) on `device`, its SGD
    optimizer, and one random batch in host memory."""
    torch.manual_seed(0)
    model = build_model(args).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                nesterov=True, weight_decay=1e-4)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, args.classes, (args.batch,))
    return model, optimizer, images, labels


def run_worker(args):
    torch.set_num_threads(args.threads)
    model, optimizer, images, labels = training_setup(args, torch.device("cpu"))

    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            print(time.perf_counter() - start, flush=True)
        elif cmd == "rss":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(peak, flush=True)
        elif cmd == "quit":
            break
        elif cmd:
            print(f"unknown command: {cmd!r}", file=sys.stderr, flush=True)
            return 2
    return 0


def cudnn_version():
    """torch's cuDNN version as "major.minor.patch" (None without cuDNN)."""
    v = torch.backends.cudnn.version()
    if v is None:
        return None
    # cuDNN 9 encodes major * 10000 + minor * 100 + patch, cuDNN 8 major * 1000 + ...
    major, rest = divmod(v, 10000) if v >= 90000 else divmod(v, 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def run_gpu(args):
    """Training steps on the GPU, timed as ``densenet bench`` times ours; prints one JSON line.

    Like for like with ours: no TF32 (the caller also sets NVIDIA_TF32_OVERRIDE=0); each step
    is wall clock (time.perf_counter) from copying the batch, which lives in host memory, to
    the device, to reading the loss back (loss.item(), which waits for the step), as our
    bench writes the batch, runs the step and reads the loss. cuDNN chooses its algorithms by
    timing them (benchmark=True); with --deterministic only among the deterministic ones
    (cudnn.deterministic=True, benchmark kept on: PyTorch then times the deterministic
    candidates only), the closest to ours, which keeps only deterministic algorithms of
    cuDNN's own search. --compile runs torch.compile(mode="reduce-overhead"): PyTorch's own
    CUDA graphs where it can use them. The memory peak is reset after the warm-up steps and empty_cache(), so
    neither the benchmark trials' workspaces nor compilation count.
    """
    if not torch.cuda.is_available():
        print("error: no CUDA device visible to PyTorch", file=sys.stderr)
        return 1
    import json
    import statistics
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = args.deterministic
    dev = torch.device("cuda")
    model, optimizer, images, labels = training_setup(args, dev)
    forward = torch.compile(model, mode="reduce-overhead") if args.compile else model
    # With CUDA graphs, a new step must not reuse the previous step's graph outputs.
    mark_step = torch.compiler.cudagraph_mark_step_begin if args.compile else None

    def step():
        start = time.perf_counter()
        if mark_step is not None:
            mark_step()
        x = images.to(dev, non_blocking=False)
        y = labels.to(dev, non_blocking=False)
        optimizer.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        loss.item()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    timed_start = time.time()
    times = [step() for _ in range(args.steps)]
    timed_end = time.time()
    median = statistics.median(times)
    print(json.dumps({
        "mode": args.mode, "arch": args.arch, "depth": args.depth, "growth": args.growth,
        "image_size": args.image_size, "batch": args.batch,
        "steps": args.steps, "warmup": args.warmup,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cudnn": {"version": cudnn_version(), "cuda": torch.version.cuda},
        "deterministic": args.deterministic, "benchmark": True, "compile": args.compile,
        "graphs": "torch.compile" if args.compile else "eager",
        "step_ms": 1e3 * median, "images_per_s": args.batch / median,
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
        "timed_start_unix_s": timed_start, "timed_end_unix_s": timed_end,
    }))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("params", help="print reference parameter counts")
    # The model and batch of training_setup, for both benchmarks.
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--mode", choices=["naive", "checkpointed"], required=True)
    model.add_argument("--arch", choices=["densenet121", "densenet169", "densenet201",
                                          "densenet161", "densenet264"],
                       help="torchvision's ImageNet DenseNet instead of the CIFAR DenseNet3")
    model.add_argument("--depth", type=int, default=100)
    model.add_argument("--growth", type=int, default=12)
    model.add_argument("--batch", type=int, default=64)
    model.add_argument("--classes", type=int, help="default 10, with --arch 1000")
    model.add_argument("--image-size", type=int, help="default 32, with --arch 224")
    worker = sub.add_parser("worker", parents=[model], help="benchmark worker driven over stdin")
    worker.add_argument("--threads", type=int, default=2)
    gpu = sub.add_parser("gpu", parents=[model], help="training steps on the GPU, one JSON line")
    gpu.add_argument("--steps", type=int, default=20)
    gpu.add_argument("--warmup", type=int, default=5)
    gpu.add_argument("--deterministic", action="store_true",
                     help="cuDNN's benchmark search among deterministic algorithms only")
    gpu.add_argument("--compile", action="store_true",
                     help='torch.compile(mode="reduce-overhead"): PyTorch\'s CUDA graphs')
    args = parser.parse_args()
    if args.command != "params":
        imagenet = args.arch is not None
        args.classes = args.classes or (1000 if imagenet else 10)
        args.image_size = args.image_size or (224 if imagenet else 32)
        if not imagenet and args.image_size != 32:
            parser.error("the CIFAR DenseNet3 takes 32x32 inputs only (--image-size needs --arch)")

    if args.command == "params":
        print_params()
        return 0
    if args.command == "gpu":
        return run_gpu(args)
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
