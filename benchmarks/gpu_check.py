"""GPU check and ResNet-50 inversion timing (run on a CUDA machine; not a test).

1. Correctness on CUDA: `invert_images` on the GPU agrees with the CPU run, bf16 autocast
   (`amp=True`) runs and lowers the loss, `LinearCKA` on CUDA tensors equals the CPU value.
2. Speed: one ResNet-50 inversion batch at 224x224 (torchvision, 1000 classes): iterations
   per second in fp32 and with bf16 autocast, at batch 32 (the paper's) and 128, against a
   bare forward+backward loop; peak memory per batch.

    PYTHONPATH=src python benchmarks/gpu_check.py --out benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from invsim import LinearCKA, linear_cka
from invsim.inversion import invert_images, relative_loss
from invsim.models import load_model
from invsim.representation import representation


def correctness(device: str) -> dict:
    torch.manual_seed(0)
    model = load_model("lenet")
    g = torch.Generator().manual_seed(0)
    seeds, targets = torch.rand(16, 1, 28, 28, generator=g), torch.rand(16, 1, 28, 28, generator=g)
    cpu = invert_images(model, seeds, targets, iterations=20, progress=False)
    gpu = invert_images(model, seeds, targets, iterations=20, progress=False, device=device)
    amp = invert_images(model, seeds, targets, iterations=20, progress=False, device=device,
                        amp=True)  # fmt: skip
    model.to("cpu")
    x = torch.randn(4000, 64, generator=g) + 100
    y = x[:, :32] @ torch.randn(32, 32, generator=g) + torch.randn(4000, 32, generator=g)
    acc = LinearCKA()
    for xb, yb in zip(x.split(500), y.split(500), strict=True):
        acc.update(xb.to(device), yb.to(device))
    return {
        "max_abs_image_diff_gpu_vs_cpu": float((gpu.images - cpu.images).abs().max()),
        "loss_gpu_vs_cpu": [float(gpu.loss.median()), float(cpu.loss.median())],
        "amp_median_loss": float(amp.loss.median()),
        "amp_initial_loss": float(amp.initial_loss.median()),
        "linear_cka_cuda_minus_cpu": acc.compute() - linear_cka(x, y),
    }


def resnet_features(model):
    """The torchvision ResNet forward up to the classifier input, written out."""
    net = model.model

    def f(x):
        h = (x - model.mean) / model.std
        h = net.maxpool(net.relu(net.bn1(net.conv1(h))))
        h = net.layer4(net.layer3(net.layer2(net.layer1(h))))
        return torch.flatten(net.avgpool(h), 1)

    return f


def bare(model, x, t, iterations):
    """The compute bound: forward to the representation, backward, a plain update."""
    feats = resnet_features(model)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iterations):
        x.requires_grad_(True)
        loss = relative_loss(feats(x), t)
        (g,) = torch.autograd.grad(loss.sum(), x)
        x = (x.detach() - 0.125 * g).clamp(0, 1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iterations


def speed(device: str, batch: int, amp: bool, iterations: int) -> dict:
    torch.manual_seed(0)
    model = load_model("tv:resnet50", num_classes=1000).to(device)
    g = torch.Generator().manual_seed(1)
    seeds = torch.rand(batch, 3, 224, 224, generator=g)
    targets = torch.rand(batch, 3, 224, 224, generator=g)
    invert_images(model, seeds, targets, iterations=3, batch_size=batch, progress=False,
                  amp=amp)  # warm-up (cudnn autotune, allocator)  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = invert_images(model, seeds, targets, iterations=iterations, batch_size=batch,
                      progress=False, amp=amp)  # fmt: skip
    torch.cuda.synchronize()
    per_it = (time.perf_counter() - t0) / iterations
    peak = torch.cuda.max_memory_allocated() / 2**30
    out = {"batch": batch, "amp_bf16": amp, "iterations": iterations,
           "iterations_per_s": 1 / per_it, "images_iterations_per_s": batch / per_it,
           "peak_gib": peak, "loss_drop": [float(r.initial_loss.median()),
                                           float(r.loss.median())]}  # fmt: skip
    if not amp:
        with torch.no_grad():
            t = representation(model, targets.to(device))
        out["bare_s_per_iter"] = bare(model, seeds.to(device), t, iterations)
        out["overhead"] = per_it / out["bare_s_per_iter"] - 1
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    p.add_argument("--iterations", type=int, default=30)
    args = p.parse_args()
    device = "cuda"
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "correctness": correctness(device),
        "resnet50_224": [],
    }
    print(json.dumps(result["correctness"], indent=1), flush=True)
    for batch in (32, 128):
        for amp in (False, True):
            row = speed(device, batch, amp, args.iterations)
            result["resnet50_224"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
