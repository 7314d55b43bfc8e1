"""Deployment target profiles as data: ``vitopt/deploy/targets.yaml`` (shipped with the package).

A profile says what a device can run (compute capability, memory, tensor-core precisions, DLA
cores), which TensorRT line supports it (Jetson / JetPack 6 stays on TensorRT 10.x; TensorRT 11.x is
strongly typed, see the TensorRT "Migrating from 10.x to 11.x" guide; TensorRT 11.4.1 runs DLA again on
Jetson AGX Orin with JetPack >= 7.2.2, per its release notes) and the defaults a build uses
(optimization-profile batch sizes, workspace). :func:`load_targets` validates the YAML with pydantic,
so a user-supplied profile file gets the same checks. ``vitopt targets`` prints them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vitopt.errors import VitoptError

__all__ = ["PRECISIONS", "TargetProfile", "load_targets", "get_target", "TARGETS_FILE"]

#: precisions vitopt builds for, in order of decreasing width.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "fp8")
Precision = Literal["fp32", "fp16", "bf16", "int8", "fp8"]

TARGETS_FILE = Path(__file__).with_name("targets.yaml")


class TargetProfile(BaseModel):
    """One deployment device (a row of ``targets.yaml``).

    Attributes:
        key: the short name used on the command line (``h100``, ``orin-agx``).
        name: marketing name with memory size.
        kind: ``"server"`` (data-center GPU) or ``"jetson"`` (embedded module).
        compute_capability: CUDA compute capability ``"major.minor"`` (9.0 Hopper, 8.9 Ada,
            8.7 Orin, 8.0 A100).
        memory_gib: device memory in GiB (shared LPDDR5 on Jetson).
        precisions: tensor-core precisions the device runs (FP8 needs compute capability >= 8.9).
        dla_cores: NVDLA cores (Orin AGX / NX: 2; 0 = none); DLA runs FP16 and INT8 only.
        tensorrt_majors: TensorRT major versions that support the device; ``tensorrt_default`` the
            one a build assumes when the installed version is unknown.
        jetpack: JetPack release the profile assumes (Jetson only).
        dla_tensorrt11: the first TensorRT 11 release that runs this device's DLA (``"11.4.1"`` for AGX
            Orin, TensorRT 11.4.1 release notes), or None when DLA needs TensorRT 10.x.
        dla_tensorrt11_jetpack: the JetPack that release needs for DLA (``"7.2.2"``), or None.
        batch_sizes: ascending; the build's optimization profile is (first, middle, last) =
            (min, opt, max) and validation measures latency at each.
        workspace_mib: TensorRT builder workspace memory-pool limit in MiB.
    """

    model_config = ConfigDict(extra="forbid")

    key: str
    name: str
    kind: Literal["server", "jetson"]
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    memory_gib: float = Field(gt=0)
    precisions: list[Precision] = Field(min_length=1)
    dla_cores: int = Field(ge=0)
    tensorrt_majors: list[Literal[10, 11]] = Field(min_length=1)
    tensorrt_default: Literal[10, 11]
    jetpack: str | None = None
    dla_tensorrt11: str | None = Field(default=None, pattern=r"^11\.\d+\.\d+$")
    dla_tensorrt11_jetpack: str | None = None
    batch_sizes: list[int] = Field(min_length=1)
    workspace_mib: int = Field(ge=16)

    @model_validator(mode="after")
    def _consistent(self) -> TargetProfile:
        """Raise ValueError for a default TensorRT line the device lacks, unsorted batches or FP8 below sm89."""
        if self.tensorrt_default not in self.tensorrt_majors:
            raise ValueError(f"tensorrt_default {self.tensorrt_default} is not in tensorrt_majors "
                             f"{self.tensorrt_majors}")
        if any(b < 1 for b in self.batch_sizes) or self.batch_sizes != sorted(set(self.batch_sizes)):
            raise ValueError(f"batch_sizes {self.batch_sizes} must be positive, ascending and unique")
        if "fp8" in self.precisions and self.sm < 89:
            raise ValueError(f"fp8 needs compute capability >= 8.9, not {self.compute_capability}")
        if self.dla_tensorrt11 is not None and (self.dla_cores == 0 or 11 not in self.tensorrt_majors):
            raise ValueError("dla_tensorrt11 needs dla_cores > 0 and 11 in tensorrt_majors")
        return self

    @property
    def sm(self) -> int:
        """Compute capability as an integer, e.g. 90 for ``"9.0"``."""
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)

    @property
    def profile(self) -> tuple[int, int, int]:
        """Default optimization profile ``(min, opt, max)`` batch sizes."""
        b = self.batch_sizes
        return b[0], b[len(b) // 2], b[-1]

    @property
    def supports_sparsity(self) -> bool:
        """2:4 structured sparsity on tensor cores (Ampere, compute capability >= 8.0)."""
        return self.sm >= 80


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict[str, TargetProfile]:
    p = Path(path)
    if not p.is_file():
        raise VitoptError(f"target profile file {p} does not exist.")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise VitoptError(f"target profile file {p} is not valid YAML ({str(exc).splitlines()[0]}).") from None
    if not isinstance(raw, dict) or not raw:
        raise VitoptError(f"target profile file {p} must map target names to profiles.")
    out = {}
    for key, body in raw.items():
        try:
            out[str(key)] = TargetProfile(key=str(key), **(body or {}))
        except (ValidationError, TypeError) as exc:
            first = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": (), "msg": str(exc)}
            where = ".".join(str(x) for x in first["loc"])
            raise VitoptError(f"{p}: target {key!r}{' field ' + where if where else ''}: {first['msg']}.") from None
    return out


def load_targets(path: str | os.PathLike | None = None) -> dict[str, TargetProfile]:
    """All target profiles, by key, in file order.

    Args:
        path: a profile YAML with the same fields; default the packaged ``targets.yaml``.

    Raises:
        VitoptError: a missing or malformed file (names the target and field).
    """
    return dict(_load(str(Path(path) if path else TARGETS_FILE)))


def get_target(key: str, path: str | os.PathLike | None = None) -> TargetProfile:
    """The profile named ``key`` (e.g. ``"orin-agx"``).

    Raises:
        VitoptError: an unknown key; the message lists the known ones.
    """
    targets = load_targets(path)
    if key not in targets:
        raise VitoptError(f"unknown target {key!r}; known targets: {', '.join(targets)}.")
    return targets[key]
