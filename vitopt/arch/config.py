"""ArchConfig: a pruned model's shape as JSON, and rebuilding a model from it.

``arch.json`` + ``model.safetensors`` are a complete, recipe-free description of a (pruned) model
(invariant 3 of docs/architecture.md): :func:`load_pruned` creates the timm model by name and kwargs, resizes every
coupled parameter to the stored dims through the family's Structure, updates the module attributes,
then loads the weights strictly. The model is still the timm class, with ``forward_features`` and
``forward_head`` intact.

``arch.json`` also records the input preprocessing the model was trained and validated with (when
it was made by ``vitopt run``): :func:`set_preprocessing` writes it into the model's timm
``pretrained_cfg`` so that ``timm.data.resolve_data_config({}, model=model)`` returns it, and
:func:`load_pruned` puts it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitopt.arch.families import family_of, get_family
from vitopt.arch.structure import KEPT_UNITS_ATTR
from vitopt.arch.token_selector import attach_token_selector
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_json, load_weights, read_json, save_weights

__all__ = ["ArchConfig", "create_model", "arch_of", "resize_to", "save", "save_pruned", "load_pruned", "set_param",
           "set_preprocessing", "preprocessing_of", "PREPROCESSING_KEYS", "ARCH_FILE", "WEIGHTS_FILE", "drop_units",
           "KEPT_UNITS_ATTR"]

ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
#: keys of a preprocessing record: timm's data-config keys (``timm.data.resolve_data_config``) plus the PIL
#: mode images are converted to first (``image_mode``, timm ``train.py``'s ``input_img_mode``) and the class names.
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "image_mode",
                      "class_names")
#: where the record sits in ``model.pretrained_cfg`` besides timm's own keys.
_CFG_KEY = "vitopt_preprocessing"



@dataclass
class ArchConfig:
    """The shape of a model: which timm model it started from and the size of every group.

    Attributes:
        family: family key (``"vit"``).
        model_name: timm model name, e.g. ``"deit_small_patch16_224"``.
        model_kwargs: kwargs given to ``timm.create_model`` (img_size, num_classes, ...).
        dims: group name -> number of units, e.g. ``{"embed": 384, "blocks.0.heads": 6, ...}``.
    """

    family: str
    model_name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    #: SViTE+ token selector config (:meth:`vitopt.sparsity.token_selector.TokenSelector.config`), or None.
    token_selector: dict[str, int] | None = None
    #: input preprocessing and class names (:data:`PREPROCESSING_KEYS`, see :func:`set_preprocessing`), or None.
    preprocessing: dict[str, Any] | None = None
    #: depth pruning: group (``"blocks"``) -> indices of the kept blocks in the model ``model_kwargs`` build,
    #: e.g. ``{"blocks": [0, 1, 2, 4, 5, 7]}``; None when no block was removed.
    kept_units: dict[str, list[int]] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"format_version": FORMAT_VERSION, **asdict(self)}
        for key in ("token_selector", "preprocessing", "kept_units"):
            if out[key] is None:                # files without them stay as before
                del out[key]
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str = "arch.json") -> ArchConfig:
        """Parse the JSON object written by :meth:`to_json`; VitoptError names ``where`` if malformed."""
        try:
            return cls(family=str(obj["family"]), model_name=str(obj["model_name"]),
                       model_kwargs=dict(obj.get("model_kwargs", {})),
                       dims={str(k): int(v) for k, v in obj["dims"].items()},
                       token_selector=({str(k): int(v) for k, v in obj["token_selector"].items()}
                                       if obj.get("token_selector") is not None else None),
                       preprocessing=(_check_preprocessing(obj["preprocessing"])
                                      if obj.get("preprocessing") is not None else None),
                       kept_units=({str(k): [int(i) for i in v] for k, v in obj["kept_units"].items()}
                                   if obj.get("kept_units") is not None else None))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise VitoptError(f"{where} is not a vitopt architecture file (missing or bad field: {exc}).") from None


def _check_preprocessing(prep: Any) -> dict[str, Any]:
    """``prep`` as a plain dict with the known keys, lists for tuples; raises ValueError / TypeError if malformed."""
    if not isinstance(prep, dict):
        raise TypeError(f"preprocessing is {type(prep).__name__}, not an object")
    out = {k: prep[k] for k in PREPROCESSING_KEYS if k in prep}
    missing = [k for k in ("input_size", "mean", "std") if k not in out]
    if missing:
        raise KeyError(f"preprocessing.{missing[0]}")
    for k in ("input_size", "mean", "std", "class_names"):
        if k in out:
            out[k] = list(out[k])
    if len(out["input_size"]) != 3 or not len(out["mean"]) == len(out["std"]) == out["input_size"][0]:
        raise ValueError("preprocessing needs input_size [C, H, W] and C values of mean and std")
    return out


def set_preprocessing(model: nn.Module, preprocessing: dict[str, Any],
                      class_names: Sequence[str] | None = None) -> nn.Module:
    """Record the input preprocessing (and class names) on ``model`` where timm looks for it, in place.

    ``model.pretrained_cfg`` gets timm's keys ``input_size`` (C, H, W), ``interpolation``, ``mean``, ``std``,
    ``crop_pct``, ``crop_mode``, ``num_classes`` and ``label_names`` (timm ``PretrainedCfg`` fields), so
    ``timm.data.resolve_data_config({}, model=model)`` returns the record and
    ``timm.data.create_transform(**that, is_training=False)`` builds vitopt's eval transform; ``test_*`` sizes
    are dropped (they described the original weights). Images go through it after conversion to
    ``image_mode`` (``L`` for a 1-channel model: timm ``train.py``'s ``input_img_mode`` rule). The whole record
    is also kept under ``pretrained_cfg["vitopt_preprocessing"]`` for :func:`preprocessing_of`, so
    :func:`save_pruned` writes it to ``arch.json`` and copies and pruned versions of the model carry it.

    Args:
        model: a timm model.
        preprocessing: keys of :data:`PREPROCESSING_KEYS` (``input_size``, ``mean``, ``std`` required).
        class_names: class names, index = label (override ``preprocessing["class_names"]``).

    Returns:
        ``model``.

    Raises:
        VitoptError: a malformed record.
    """
    try:
        prep = _check_preprocessing({**preprocessing, **({"class_names": list(class_names)} if class_names else {})})
    except (KeyError, TypeError, ValueError) as exc:
        raise VitoptError(f"preprocessing record is malformed ({exc}).") from None
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    for key in ("test_input_size", "test_crop_pct", "test_crop_mode"):
        cfg.pop(key, None)
    cfg.update(input_size=tuple(prep["input_size"]), mean=tuple(prep["mean"]), std=tuple(prep["std"]))
    cfg.update({k: prep[k] for k in ("interpolation", "crop_pct", "crop_mode") if k in prep})
    if "class_names" in prep:
        cfg.update(label_names=tuple(prep["class_names"]), num_classes=len(prep["class_names"]))
    cfg[_CFG_KEY] = prep
    model.pretrained_cfg = cfg
    return model


def preprocessing_of(model: nn.Module) -> dict[str, Any] | None:
    """The record :func:`set_preprocessing` left on ``model`` (a copy), or None."""
    prep = (getattr(model, "pretrained_cfg", None) or {}).get(_CFG_KEY)
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in prep.items()} if prep else None


def create_model(name: str, kwargs: dict[str, Any] | None = None, *, pretrained: bool = False,
                 checkpoint: str | Path | None = None) -> nn.Module:
    """Create a timm model by name; optionally load local weights (safetensors or weights_only torch).

    ``pretrained=True`` downloads through timm (needs network). ``checkpoint`` loads a dense state
    dict matching the created model.

    Raises:
        VitoptError: unknown model name, failed pretrained download, or a checkpoint that does not fit.
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise VitoptError(f"model {name!r} is not a timm model name (similar: {', '.join(close) or 'none'}).")
    kwargs = dict(kwargs or {})
    try:
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as exc:
            if "img_size" not in kwargs or "img_size" not in str(exc):
                raise
            # a resolution-agnostic model (PVTv2): create it without img_size, then record the size
            model = timm.create_model(name, pretrained=pretrained, **{k: v for k, v in kwargs.items() if k != "img_size"})
            _record_input_size(model, kwargs["img_size"])
    except TypeError as exc:
        raise VitoptError(f"model {name!r} rejected its kwargs: {exc}.") from None
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise VitoptError(f"pretrained weights for {name!r} could not be loaded ({exc}); "
                              "use pretrained: false or checkpoint: PATH offline.") from None
        raise
    if checkpoint is not None:
        state = load_weights(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0:2]
            raise VitoptError(f"checkpoint {checkpoint} does not match model {name!r}: {' '.join(first)}") from None
    return model


def _record_input_size(model: nn.Module, img_size: Any) -> None:
    """Record ``img_size`` (int or (H, W)) as ``patch_embed.img_size`` and in ``pretrained_cfg["input_size"]``
    for a model whose constructor takes no ``img_size`` (PVTv2): the data pipeline resizes images to it
    and the cost model counts MACs at it.

    Raises:
        VitoptError: ``img_size`` is not a positive int or a pair of them, or the model has no patch embedding.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise VitoptError(f"model kwarg img_size must be a positive int or [H, W], got {img_size!r}.")
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        raise VitoptError(f"model {type(model).__name__} takes no img_size and has no patch_embed to record it on.")
    pe.img_size = (int(size[0]), int(size[1]))
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
    cfg["input_size"] = (int(chans), *pe.img_size)
    model.pretrained_cfg = cfg


def arch_of(model: nn.Module, model_name: str, model_kwargs: dict[str, Any] | None = None, *,
            kept_units: bool = True) -> ArchConfig:
    """The :class:`ArchConfig` of a live model (its current dims).

    ``kept_units``: record which blocks a depth prune kept (:data:`KEPT_UNITS_ATTR`), relative to the model
    ``model_kwargs`` build; pass False when ``model_kwargs`` already describe the current depth.
    """
    fam = family_of(model)
    selector = getattr(model, "token_selector", None)
    kept = getattr(model, KEPT_UNITS_ATTR, None) if kept_units else None
    return ArchConfig(fam.name, model_name, dict(model_kwargs or {}), fam.read_dims(model),
                      selector.config() if selector is not None else None, preprocessing_of(model),
                      {g: list(v) for g, v in kept.items()} if kept else None)


def drop_units(model: nn.Module, group: str, keep: Sequence[int]) -> None:
    """Depth surgery: keep only the units ``keep`` (sorted indices) of a whole-module group, in place.

    The group's container (``model.blocks``, an ``nn.Sequential`` or ``nn.ModuleList`` named like the
    group) is replaced by one holding the kept units in order, so the residual stream passes straight
    through where a block was (pre-norm blocks: ``x + f(x)`` with ``f`` gone is ``x``). The kept indices,
    composed with earlier drops, are recorded on the model (:data:`KEPT_UNITS_ATTR`) for ``arch.json``, and
    ``model.feature_info`` entries naming the units are renumbered (timm's ``features_only`` metadata).

    Raises:
        VitoptError: the group is not a Sequential/ModuleList of the model, or ``keep`` is empty or out of range.
    """
    container = model.get_submodule(group)
    if not isinstance(container, (nn.Sequential, nn.ModuleList)):
        raise VitoptError(f"depth pruning: {group} is a {type(container).__name__}, not an nn.Sequential or "
                          "nn.ModuleList of blocks.")
    old = len(container)
    keep = [int(i) for i in keep]
    if not keep or min(keep) < 0 or max(keep) >= old or len(set(keep)) != len(keep):
        raise VitoptError(f"depth pruning: keep {keep} of {group} must be unique indices in [0, {old}), at least one.")
    mods = [container[i] for i in keep]
    new = nn.Sequential(*mods) if isinstance(container, nn.Sequential) else nn.ModuleList(mods)
    owner, _, leaf = group.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, new)
    record = dict(getattr(model, KEPT_UNITS_ATTR, None) or {})
    prev = record.get(group, list(range(old)))
    record[group] = [prev[i] for i in keep]
    setattr(model, KEPT_UNITS_ATTR, record)
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and all(isinstance(e, dict) for e in info):
        where = {f"{group}.{i}": j for j, i in enumerate(keep)}
        units = {f"{group}.{i}" for i in range(old)}
        model.feature_info = [{**e, "module": f"{group}.{where[e.get('module')]}"} if e.get("module") in where else e
                              for e in info if e.get("module") not in units or e.get("module") in where]


def resize_to(model: nn.Module, dims: dict[str, int], kept_units: dict[str, list[int]] | None = None) -> nn.Module:
    """Resize every coupled parameter of ``model`` to ``dims`` (new, uninitialised storage) in place.

    Used to rebuild a pruned model before loading its weights; values are NOT preserved (use
    :func:`vitopt.arch.surgery.apply_plan` to keep values). A whole-module group (``blocks``) smaller in
    ``dims`` than in the model first drops the blocks not in ``kept_units[group]`` (from ``arch.json``),
    or the last blocks when that record is absent or does not fit.

    Raises:
        VitoptError: ``dims`` names groups the model does not have, or more blocks than it has.
    """
    fam = family_of(model)
    structure = fam.structure(model)
    for group, paths in structure.units.items():
        n = dims.get(group)
        recorded = (kept_units or {}).get(group)
        if n is not None and n == len(paths) and recorded is not None and len(recorded) == n:
            # the skeleton already holds exactly the kept blocks (kwargs read back): keep their provenance
            setattr(model, KEPT_UNITS_ATTR, {**(getattr(model, KEPT_UNITS_ATTR, None) or {}), group: list(recorded)})
            continue
        if n is None or n == len(paths):
            continue
        if not 1 <= n < len(paths):
            raise VitoptError(f"architecture has {n} units in {group!r} but the model built from its kwargs has "
                              f"{len(paths)}.")
        keep = (kept_units or {}).get(group)
        if keep is None or len(keep) != n or len(set(keep)) != n or min(keep) < 0 or max(keep) >= len(paths):
            keep = list(range(n))
        drop_units(model, group, sorted(keep))
        structure = fam.structure(model)
    unknown = set(dims) - set(structure.groups)
    if unknown:
        raise VitoptError(f"architecture names groups this model does not have: {sorted(unknown)[:5]}.")
    shapes: dict[str, list[int]] = {}
    for lay in structure.layouts:
        shape = shapes.setdefault(lay.param, list(model.get_parameter(lay.param).shape))
        shape[lay.axis] = lay.new_length(dims)
    for name, shape in shapes.items():
        old = model.get_parameter(name)
        set_param(model, name, torch.empty(shape, dtype=old.dtype, device=old.device), old.requires_grad)
    fam.set_dims(model, {**fam.read_dims(model), **dims})
    return model


def set_param(model: nn.Module, name: str, value: torch.Tensor, requires_grad: bool = True) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    setattr(module, leaf, nn.Parameter(value, requires_grad=requires_grad))


def save_pruned(model: nn.Module, directory: str | Path, model_name: str,
                model_kwargs: dict[str, Any] | None = None, *, kept_units: bool = True) -> ArchConfig:
    """Write ``arch.json`` and ``model.safetensors`` for ``model`` into ``directory`` (atomically).

    ``arch.json`` includes the model's preprocessing record (:func:`preprocessing_of`) when it has one,
    and the kept blocks of a depth prune relative to the model ``model_kwargs`` build (``kept_units``,
    see :func:`arch_of`). Returns the ArchConfig written.
    """
    directory = Path(directory)
    arch = arch_of(model, model_name, model_kwargs, kept_units=kept_units)
    save_weights(directory / WEIGHTS_FILE, model.state_dict(), metadata={"format": "pt", "vitopt": "1"})
    atomic_write_json(directory / ARCH_FILE, arch.to_json())
    return arch


def save(model: nn.Module, directory: str | Path, *, model_name: str | None = None,
         model_kwargs: dict[str, Any] | None = None) -> ArchConfig:
    """Save a (pruned) model as ``arch.json`` + ``model.safetensors`` so :func:`load_pruned` (``vitopt.load``)
    rebuilds it without the code or recipe that made it (``vitopt.save``).

    Args:
        model: a timm model of a registered family, pruned or not.
        directory: destination folder (created; files written atomically).
        model_name: the timm model name; default ``model.pretrained_cfg["architecture"]``.
        model_kwargs: the ``timm.create_model`` kwargs the model was made with; default: read back from
            the model by its family (:meth:`~vitopt.arch.families.base.Family.constructor_kwargs`),
            then checked by rebuilding the model and comparing every parameter's name and shape.

    Returns:
        the :class:`ArchConfig` written.

    Raises:
        VitoptError: no model name can be found, or the kwargs read back do not rebuild this model
            (the message says to pass ``model_kwargs``).
    """
    fam = family_of(model)
    name = model_name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise VitoptError("vitopt.save needs model_name= (the timm model name): the model has no "
                          "pretrained_cfg['architecture'].")
    if model_kwargs is None:
        kwargs = fam.constructor_kwargs(model)      # a depth-pruned model: the skeleton holding its kept blocks
        try:
            rebuilt = resize_to(create_model(name, kwargs), fam.read_dims(model), getattr(model, KEPT_UNITS_ATTR, None))
            ok = ({k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
                  == {k: tuple(v.shape) for k, v in model.state_dict().items()})
        except (VitoptError, TypeError, ValueError, AssertionError, RuntimeError):
            ok = False
        if not ok:
            raise VitoptError(f"the {type(model).__name__} cannot be rebuilt from {name!r} with the kwargs vitopt "
                              "reads back from it; pass model_kwargs= (the timm.create_model kwargs it was made with).")
        model_kwargs = kwargs
    return save_pruned(model, directory, name, model_kwargs)


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild a (pruned) model from a directory holding ``arch.json`` and ``model.safetensors``.

    Args:
        path: the directory, or the path of its ``arch.json``.

    Returns:
        The timm model in eval mode, on CPU, with the stored weights, and the recorded preprocessing in its
        ``pretrained_cfg`` (:func:`set_preprocessing`) when ``arch.json`` has one.

    Raises:
        VitoptError: missing/malformed files, unknown family or model, or weights that do not match
            the architecture.
    """
    path = Path(path)
    directory = path.parent if path.name == ARCH_FILE else path
    if not directory.is_dir():
        raise VitoptError(f"{directory} is not a directory with {ARCH_FILE} and {WEIGHTS_FILE}.")
    arch = ArchConfig.from_json(read_json(directory / ARCH_FILE, "architecture file"), str(directory / ARCH_FILE))
    get_family(arch.family)
    model = create_model(arch.model_name, arch.model_kwargs)
    resize_to(model, arch.dims, arch.kept_units)
    if arch.token_selector is not None:        # SViTE+ selector: re-attach before loading its weights
        attach_token_selector(model, **arch.token_selector)
    state = load_weights(directory / WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).strip().splitlines()[:2])
        raise VitoptError(f"{directory / WEIGHTS_FILE} does not match {directory / ARCH_FILE}: {first}") from None
    if arch.preprocessing is not None:
        set_preprocessing(model, arch.preprocessing)
    return model.eval()
