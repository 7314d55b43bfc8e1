"""TensorBoard logging of training stages (``log.tensorboard: true`` in a recipe).

Every epoch record of every training stage is written as scalars ``<stage>/<key>`` (loss, val
top-1, lr, gate statistics...) with the epoch as the step, into ``RUN_DIR/tensorboard``; open it with
``tensorboard --logdir RUN_DIR/tensorboard``. Uses ``torch.utils.tensorboard.SummaryWriter``
(PyTorch docs), which needs the ``tensorboard`` package (extra ``vitopt[tensorboard]``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vitopt.errors import VitoptError

__all__ = ["TensorBoardLog"]


class TensorBoardLog:
    """Scalars of per-epoch training records, one tag group per stage.

    Args:
        log_dir: folder for the event files (created).

    Raises:
        VitoptError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise VitoptError("log.tensorboard: true needs the tensorboard package; install it with "
                              "pip install 'vitopt[tensorboard]' or set log.tensorboard: false.") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_epoch(self, stage: str, record: dict[str, Any]) -> None:
        """Write every finite numeric value of ``record`` as ``stage/key`` at step ``record['epoch']``."""
        step = int(record.get("epoch", 0))
        for key, value in record.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{stage}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
