"""Choosing what to remove: importance criteria, allocation under a budget, and the one prune loop.

* :mod:`~vitopt.pruning.criteria` - criteria in one registry (``l1``, ``gate``, ``taylor``, ``hessian``,
  ``kl``, ``search``);
* :mod:`~vitopt.pruning.importance` - ``vitopt.importance``;
* :mod:`~vitopt.pruning.allocation` - ``vitopt.allocate``: kept units under a FLOPs / params / latency
  budget or an exact shape, with hardware rounding;
* :mod:`~vitopt.pruning.prune` - ``vitopt.prune``: one-shot and iterative pruning;
* :mod:`~vitopt.pruning.calibration` - calibration batches from a training set.
"""
