"""The project's one error type for bad input.

Every failure caused by what a user gave us (a recipe, a path, a checkpoint, a model name) is raised
as :class:`VitoptError` with one sentence that says what was wrong, where, and what is allowed. The
CLI prints that sentence and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations


class VitoptError(Exception):
    """Bad input or an unsupported request, described in one sentence.

    Args:
        message: what was wrong, where (file, line, key path or module name) and what is allowed.

    The exit code the CLI uses for it is :data:`EXIT_CODE` (2, like argparse's usage errors).
    """

    EXIT_CODE = 2

    def __init__(self, message: str) -> None:
        message = _from_worker(message)
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


_WORKER_PREFIX = "Caught VitoptError in DataLoader worker"
_LAST_LINE = "vitopt.errors.VitoptError: "


def _from_worker(message: str) -> str:
    """The original sentence of a VitoptError re-raised by a DataLoader worker.

    torch re-raises a worker's exception as ``VitoptError("Caught VitoptError in DataLoader worker
    process N.\nOriginal Traceback ...\nvitopt.errors.VitoptError: <sentence>")``; keep only the
    sentence, so the CLI still prints one sentence and no traceback.
    """
    if not message.startswith(_WORKER_PREFIX):
        return message
    last = message.rstrip().splitlines()[-1]
    return last[len(_LAST_LINE):] if last.startswith(_LAST_LINE) else last
