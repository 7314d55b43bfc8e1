"""Training-time sparsity methods, each usable in :func:`vitopt.train.loop.fit` or in any PyTorch loop.

Every method is a :class:`~vitopt.train.callbacks.Callback`: construct it on the model, add its
``parameters()`` to the optimizer, call ``on_fit_start(model, optimizer, total_steps)`` once, then per
step add ``loss()`` to the task loss and call ``after_backward(step)`` / ``after_step(step)`` around
the optimizer step; ``finish()`` at the end folds, applies or cuts what the method learned.

* :class:`VTP` - learnable unit gates + L1 (Zhu, Tang, Han 2021, arXiv 2104.08500);
* :class:`SViTE` - unstructured dynamic sparse training: ERK, magnitude drop, RigL / SET regrow
  (Chen et al. 2021, arXiv 2106.04533);
* :class:`S2ViTE` - structured DST of heads / MLP neurons, ending in surgery;
* :class:`SViTEPlus` - SViTE+ learnable top-k token selector;
* :class:`Semi24` - 2:4 semi-structured masks for Sparse Tensor Cores (Mishra et al., arXiv 2104.08378);
* :class:`AttentionSparsityReg` - Sparse-then-Prune's attention regularizer (arXiv 2307.11988).
"""

from __future__ import annotations

from vitopt.sparsity.attention import AttentionSparsityReg
from vitopt.sparsity.dst import SViTE
from vitopt.sparsity.semi24 import Semi24
from vitopt.sparsity.structured_dst import S2ViTE
from vitopt.sparsity.token_selector import SViTEPlus
from vitopt.sparsity.vtp import VTP

__all__ = ["VTP", "SViTE", "S2ViTE", "SViTEPlus", "Semi24", "AttentionSparsityReg"]
