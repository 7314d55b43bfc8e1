"""SViTE dynamic sparse training inside your own PyTorch loop (no recipe, no vitopt training loop).

``vitopt.sparsity.SViTE`` (Chen et al., NeurIPS 2021, arXiv 2106.04533) keeps a fixed fraction of the
weights of every Linear layer in the transformer blocks (ERK allocation across layers) and, every
``update_interval`` steps, drops the smallest-magnitude weights and regrows as many where the dense
gradient is largest (RigL). The method is a set of hooks a plain loop calls::

    method = vitopt.sparsity.SViTE(model, density=0.5, update_interval=20)
    method.on_fit_start(model, optimizer, total_steps)      # once, before the first step
    loss = task_loss (+ method.loss(), None for SViTE)
    loss.backward(); method.after_backward(step)             # masks the gradients, keeps RigL scores
    optimizer.step(); method.after_step(step)                # prune-and-grow on update steps
    masks = method.finish()                                  # pruned weights stay exactly zero

The other methods (``VTP``, ``S2ViTE``, ``SViTEPlus``, ``Semi24``, ``AttentionSparsityReg``) take the
same calls. Run::

    python examples/svite_user_loop.py --density 0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from prune_finetune_digits import digits_loaders, top1, train

import vitopt


def sparse_train(model, loader, epochs: int, lr: float, density: float, update_interval: int) -> dict:
    """Train ``model`` in place with SViTE; returns the final per-layer density and the update count."""
    method = vitopt.sparsity.SViTE(model, density=density, update_interval=update_interval, t_end=0.8)
    opt = torch.optim.AdamW([*model.parameters(), *method.parameters()], lr=lr, weight_decay=0.05)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    method.on_fit_start(model, opt, total)
    step = 0
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            extra = method.loss()
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward(step)
            opt.step()
            method.after_step(step)
            sched.step()
            step += 1
    masks = method.finish()
    kept = sum(int(m.sum()) for m in masks.values())
    total_w = sum(m.numel() for m in masks.values())
    return {"density": kept / total_w, "mask_updates": method.updates, "layers": len(masks)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20, help="dense training epochs")
    p.add_argument("--sparse-epochs", type=int, default=15, help="SViTE epochs")
    p.add_argument("--density", type=float, default=0.5, help="kept fraction of the blocks' Linear weights")
    p.add_argument("--update-interval", type=int, default=20, help="optimizer steps between prune-and-grow")
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/example_svite"))
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train_loader, val_loader = digits_loaders(seed=args.seed)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              num_classes=10, embed_dim=args.embed_dim, depth=args.depth, num_heads=4)
    train(model, train_loader, args.epochs, lr=2e-3)
    dense_top1 = top1(model, val_loader)
    info = sparse_train(model, train_loader, args.sparse_epochs, lr=5e-4, density=args.density,
                        update_interval=args.update_interval)
    sparse_top1 = top1(model, val_loader)
    result = {"dense_top1": dense_top1, "sparse_top1": sparse_top1, **info, "seed": args.seed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"dense : top-1 {dense_top1:.2f}%")
    print(f"SViTE : top-1 {sparse_top1:.2f}% with {info['density']:.1%} of the block weights "
          f"({info['mask_updates']} prune-and-grow updates over {info['layers']} layers)")
    return result


if __name__ == "__main__":
    main()
