"""Issue 17, "first contact with a user's own data": one test (at least) per item of the issue.

1. two ``vitopt run`` into one run directory: the second is refused while the first holds it;
2. Ctrl-C (SIGINT) mid-epoch exits with 130;
3. the data layout (class folders, a readable image per class, unreadable files) is checked by
   ``vitopt recipe check`` and before the first epoch;
4. the resolved preprocessing is recorded (arch.json, ``pretrained_cfg``, ONNX metadata, bundle.json) and
   timm's own ``resolve_data_config`` + ``create_transform`` reproduce the recorded top-1;
5. augmentation defaults follow the data, and ``recipe check`` / the schema show the effective values;
6. warnings for ``in_chans: 3`` on gray images and for pruning random weights;
7. progress lines when stdout is not a terminal, and the final table at the end of every run;
8. the finetune loss is labelled as the KD objective (and its CE part recorded);
9. ``vitopt.load(run_dir)``;
10. environment.json in the run; latency panels on one axis scale;
11. (in test_arch.py) FLOPs against torch.utils.flop_counter with fused attention on;
12. did-you-mean for an unknown stage type;
13. command-line usage errors: usage line, one ``Error:`` line, exit 2, no traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: a tiny model on the embedded digits; one epoch takes well under a second on one core.
TINY = {"name": "deit_tiny_patch16_224",
        "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2}}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _vitopt(*args, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitopt", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=cwd or ROOT)


def _long_run(tmp_path: Path, epochs: int = 2000) -> Path:
    """A recipe whose train stage runs for minutes (the tests stop it)."""
    p = tmp_path / "long.yaml"
    p.write_text(yaml.safe_dump({"name": "busy", "output_dir": str(tmp_path / "runs"), "model": TINY,
                                 "data": {"type": "digits"},
                                 "stages": [{"type": "train", "epochs": epochs, "batch_size": 256}]}))
    return p


def _start_and_wait_for_epoch(recipe: Path) -> tuple[subprocess.Popen, list[str]]:
    """Start ``vitopt run recipe`` and return once it printed its first epoch line (it then holds the run dir)."""
    proc = subprocess.Popen([sys.executable, "-m", "vitopt", "run", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if " epoch 1/" in line:
            return proc, lines
    proc.kill()
    raise AssertionError("the run printed no epoch line:\n" + "".join(lines))


# ------------------------------------------------------------------------------ 1. one run per directory
def test_second_run_into_a_busy_run_dir_is_refused(tmp_path):
    recipe = _long_run(tmp_path)
    first, _ = _start_and_wait_for_epoch(recipe)
    try:
        second = _vitopt("run", recipe, "--set", "stages[0].lr=0.5", timeout=90)
        run_dir = tmp_path / "runs" / "busy"
        assert second.returncode == 2, second.stdout + second.stderr
        msg = " ".join(second.stderr.split())
        assert f"run directory {run_dir} is in use by another vitopt run (pid {first.pid} on" in msg, msg
        assert "Traceback" not in second.stderr
        # the run directory still describes the first run
        assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["stages"][0]["lr"] == 1e-3
    finally:
        first.kill()
        first.wait()
    # a killed holder leaves no stale lock: the next run gets the directory
    again = _vitopt("run", recipe, "--set", "stages[0].epochs=1", "--set", "name=other", timeout=120)
    assert again.returncode == 0, again.stderr


def test_lock_is_released_and_taken_again_in_process(tmp_path):
    from vitopt.errors import VitoptError
    from vitopt.pipeline import run_lock

    with run_lock(tmp_path / "r"):
        with pytest.raises(VitoptError, match=f"pid {os.getpid()} on"):
            with run_lock(tmp_path / "r"):
                pass
    with run_lock(tmp_path / "r"):                      # released on exit
        pass


# ------------------------------------------------------------------------------ 2. SIGINT -> 130
def test_sigint_mid_epoch_exits_130_and_keeps_the_checkpoint(tmp_path):
    recipe = _long_run(tmp_path)
    proc, lines = _start_and_wait_for_epoch(recipe)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    text = "".join(lines) + out
    assert proc.returncode == 130, text
    assert "interrupted" in text and "Traceback" not in text
    assert (tmp_path / "runs" / "busy" / "00_train" / "checkpoints" / "last.pt").is_file()


# ------------------------------------------------------------------------------ 13. usage errors
USAGE_CASES = {
    "unknown option": (["deploy", "bundle", "RUN", "--target", "orin-agx", "--output", "DIR"],
                       ["No such option: --output", "--out"]),
    "unknown command": (["nosuchcmd"], ["No such command 'nosuchcmd'"]),
    "missing argument": (["run"], ["Missing argument"]),
    "bad value": (["validate", "RUN", "--threads", "abc"], ["Invalid value for '--threads'"]),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_usage_errors_print_usage_and_one_error_line(case):
    """Through a real process (the ``vitopt`` entry point's ``main()``): whatever click typer carries."""
    args, needles = USAGE_CASES[case]
    res = _vitopt(*args, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr
    assert "Traceback" not in err and 'File "' not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith("Usage: "), err
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    for n in needles:
        assert n in errors[0], (n, err)
