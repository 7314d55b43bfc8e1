"""Training-time sparsity: one module per method, each usable as a training-loop Callback.

* :mod:`.gates`, :mod:`.vtp` - VTP learnable unit gates (arXiv 2104.08500);
* :mod:`.erk`, :mod:`.dst`, :mod:`.masked` - SViTE unstructured dynamic sparse training (arXiv 2106.04533);
* :mod:`.structured_dst` - S2ViTE structured DST of heads / MLP neurons, ending in surgery;
* :mod:`.token_selector` - SViTE+ learnable top-k token selector;
* :mod:`.attention` - Sparse-then-Prune attention-sparsity regularizer (arXiv 2307.11988);
* :mod:`.semi24` - 2:4 semi-structured masks for Sparse Tensor Cores.
"""
