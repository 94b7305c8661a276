"""GPU check and ResNet-50 inversion timing (run on a CUDA machine; not a test).

1. Correctness on CUDA: `invert_images` on the GPU agrees with the CPU run, bf16 autocast
   (`amp=True`) runs and lowers the loss, L-BFGS steps (the converging schedule's rule)
   agree with the CPU's and run under bf16 autocast, `LinearCKA` on CUDA tensors equals
   the CPU value.
2. Speed: one ResNet-50 inversion batch at 224x224 (torchvision, 1000 classes): iterations
   per second in fp32, with bf16 autocast and in channels-last layout, at batch 32 (the
   paper's) and 128, against a bare forward+backward loop; peak memory per batch.
3. Schedules: the same pairs inverted with the paper's schedule and with
   `schedule="converge"` (L-BFGS steps) and the converging-momentum rule (continuous
   batching: finished examples leave the batch), all capped at `--cap`:
   image evaluations, seconds, and evaluations per second,
   which shows whether refilling slots costs throughput on the device.

    PYTHONPATH=src python benchmarks/gpu_check.py --out benchmarks/results/gpu.json
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/gpu.json  # plumbing only
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
    # L-BFGS steps, the converging schedule's default, in fp32 and in bf16 autocast
    qn = {"schedule": "converge", "iterations": 60, "progress": False}
    qn_gpu = invert_images(model, seeds, targets, device=device, **qn)
    qn_amp = invert_images(model, seeds, targets, device=device, amp=True, **qn)
    model.to("cpu")
    qn_cpu = invert_images(model, seeds, targets, **qn)
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
        "lbfgs_loss_gpu_vs_cpu": [float(qn_gpu.loss.median()), float(qn_cpu.loss.median())],
        "lbfgs_amp_loss": [float(qn_amp.loss.median()), float(qn_amp.initial_loss.median())],
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


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bare(model, x, t, iterations, device):
    """The compute bound: forward to the representation, backward, a plain update."""
    feats = resnet_features(model)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iterations):
        x.requires_grad_(True)
        loss = relative_loss(feats(x), t)
        (g,) = torch.autograd.grad(loss.sum(), x)
        x = (x.detach() - 0.125 * g).clamp(0, 1)
    sync(device)
    return (time.perf_counter() - t0) / iterations


def _images(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.rand(n, 3, size, size, generator=g)


def speed(device: str, setup: dict, batch: int, amp: bool, channels_last: bool) -> dict:
    torch.manual_seed(0)
    model = load_model(setup["arch"], num_classes=1000).to(device)
    seeds, targets = _images(batch, setup["size"], 1)
    iterations = setup["iterations"]
    kw = {"batch_size": batch, "progress": False, "amp": amp, "channels_last": channels_last}
    invert_images(model, seeds, targets, iterations=3, **kw)  # warm-up (autotune, allocator)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    r = invert_images(model, seeds, targets, iterations=iterations, **kw)
    sync(device)
    per_it = (time.perf_counter() - t0) / iterations
    peak = torch.cuda.max_memory_allocated() / 2**30 if str(device).startswith("cuda") else None
    out = {"batch": batch, "amp_bf16": amp, "channels_last": channels_last,
           "iterations": iterations, "iterations_per_s": 1 / per_it,
           "images_iterations_per_s": batch / per_it, "peak_gib": peak,
           "loss_drop": [float(r.initial_loss.median()), float(r.loss.median())]}  # fmt: skip
    if not amp and not channels_last:
        with torch.no_grad():
            t = representation(model, targets.to(device))
        out["bare_s_per_iter"] = bare(model, seeds.to(device), t, iterations, device)
        out["overhead"] = per_it / out["bare_s_per_iter"] - 1
    return out


def schedules(device: str, setup: dict) -> dict:
    """The paper's schedule against schedule='converge' on the same pairs, both capped."""
    torch.manual_seed(0)
    model = load_model(setup["arch"], num_classes=1000).to(device)
    seeds, targets = _images(setup["pairs"], setup["size"], 2)
    out = {"pairs": setup["pairs"], "batch": setup["batch"], "cap": setup["cap"]}
    runs = {
        "paper": {},
        "converge": {"schedule": "converge"},
        "converging-momentum": {"rule": "converging-momentum"},
    }
    for schedule, settings in runs.items():
        sync(device)
        t0 = time.perf_counter()
        r = invert_images(model, seeds, targets, iterations=setup["cap"],
                          batch_size=setup["batch"], progress=False, **settings)  # fmt: skip
        sync(device)
        seconds = time.perf_counter() - t0
        out[schedule] = {"passes": r.passes, "seconds": seconds,
                         "passes_per_s": r.passes / seconds,
                         "median_iterations": float(r.iterations.float().median()),
                         "median_loss": float(r.loss.median())}  # fmt: skip
    out["passes_ratio"] = out["converge"]["passes"] / out["paper"]["passes"]
    out["seconds_ratio"] = out["converge"]["seconds"] / out["paper"]["seconds"]
    return out


FULL = {"arch": "tv:resnet50", "size": 224, "iterations": 30, "batches": (32, 128),
        "pairs": 256, "batch": 64, "cap": 2000}  # fmt: skip
SMOKE = {"arch": "tv:resnet18", "size": 32, "iterations": 2, "batches": (4,),
         "pairs": 6, "batch": 4, "cap": 5}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    p.add_argument("--iterations", type=int, default=FULL["iterations"])
    p.add_argument("--cap", type=int, default=FULL["cap"], help="Schedules' iteration cap.")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="Tiny sizes: checks the plumbing.")
    args = p.parse_args()
    device = args.device
    setup = dict(SMOKE) if args.smoke else {**FULL, "iterations": args.iterations, "cap": args.cap}
    cuda = device.startswith("cuda")
    result = {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__,
        "setup": {k: v for k, v in setup.items() if k != "batches"},
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "correctness": correctness(device),
        "speed": [],
    }
    print(json.dumps(result["correctness"], indent=1), flush=True)
    for batch in setup["batches"]:
        for amp, channels_last in ((False, False), (True, False), (False, True)):
            row = speed(device, setup, batch, amp, channels_last)
            result["speed"].append(row)
            print(json.dumps(row), flush=True)
    result["schedules"] = schedules(device, setup)
    print(json.dumps(result["schedules"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
