"""Prune a ViT from your own PyTorch training script: no recipe, only the vitopt Python API.

A small DeiT is trained from scratch on scikit-learn's embedded digits (1,797 real 8x8 handwritten
digits) with a plain PyTorch loop, pruned to half its FLOPs with ``vitopt.prune`` (first-order Taylor
importance on a few training batches, global allocation with tensor-core rounding, physical
surgery), fine-tuned with knowledge distillation from the dense model (Hinton et al. 2015,
arXiv 1503.02531) in the same plain loop, saved, reloaded and exported to ONNX::

    python examples/prune_finetune_digits.py --out runs/example
    python examples/prune_finetune_digits.py --epochs 2 --finetune-epochs 1   # a smoke run

It prints the dense and pruned top-1 and FLOPs, and writes ``result.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import vitopt


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train/val loaders of the digits as [B, 1, 8, 8] float tensors in [-1, 1] (80/20 split)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = len(y) // 5
    val, train = perm[:n_val], perm[n_val:]
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(TensorDataset(x[val], y[val]), batch_size=256))


@torch.no_grad()
def top1(model: torch.nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return 100.0 * hits / len(loader.dataset)


def train(model, loader, epochs: int, lr: float, teacher=None, alpha: float = 0.7, tau: float = 2.0) -> None:
    """AdamW with a cosine schedule; with a teacher, loss = alpha*tau^2*KL + (1-alpha)*CE (KD)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=0.1)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
                kd = F.kl_div(F.log_softmax(out / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                              reduction="batchmean") * tau * tau
                loss = alpha * kd + (1 - alpha) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    p.add_argument("--finetune-epochs", type=int, default=15, help="KD fine-tuning epochs after pruning")
    p.add_argument("--flops", type=float, default=0.5, help="fraction of the dense FLOPs to keep")
    p.add_argument("--embed-dim", type=int, default=96, help="model width (embed_dim)")
    p.add_argument("--depth", type=int, default=4, help="transformer blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/example_prune"))
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train_loader, val_loader = digits_loaders(seed=args.seed)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              num_classes=10, embed_dim=args.embed_dim, depth=args.depth, num_heads=4)
    train(model, train_loader, args.epochs, lr=2e-3)
    dense_top1 = top1(model, val_loader)
    print(vitopt.structure(model))

    # a few training batches for the Taylor criterion; the dense model stays untouched (no inplace)
    calibration = [batch for _, batch in zip(range(8), train_loader)]
    pruned = vitopt.prune(model, target={"flops": args.flops}, criterion="taylor", data=calibration,
                          groups=("heads", "head_dim", "mlp"), round_to={"head_dim": 8, "mlp": 16})
    pruned_top1_before = top1(pruned, val_loader)
    teacher = model.eval().requires_grad_(False)
    train(pruned, train_loader, args.finetune_epochs, lr=5e-4, teacher=teacher)
    pruned_top1 = top1(pruned, val_loader)

    vitopt.save(pruned, args.out / "model")
    again = vitopt.load(args.out / "model")
    assert top1(again, val_loader) == pruned_top1, "the reloaded model must predict exactly as the saved one"
    vitopt.export_onnx(again, args.out / "model.onnx", input_shape=(1, 8, 8))

    dense_flops, pruned_flops = vitopt.structure(model).cost("flops"), vitopt.structure(pruned).cost("flops")
    result = {"dense_top1": dense_top1, "pruned_top1_before_finetune": pruned_top1_before, "pruned_top1": pruned_top1,
              "dense_mflops": dense_flops / 1e6, "pruned_mflops": pruned_flops / 1e6,
              "flops_ratio": pruned_flops / dense_flops, "epochs": args.epochs,
              "finetune_epochs": args.finetune_epochs, "seed": args.seed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"dense   : top-1 {dense_top1:.2f}%  {dense_flops / 1e6:.2f} MFLOPs")
    print(f"pruned  : top-1 {pruned_top1_before:.2f}% before KD fine-tuning, {pruned_top1:.2f}% after  "
          f"{pruned_flops / 1e6:.2f} MFLOPs ({result['flops_ratio']:.1%} of dense)")
    print(f"wrote {args.out / 'model'} (arch.json + model.safetensors), {args.out / 'model.onnx'}, "
          f"{args.out / 'result.json'}")
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
