"""Pydantic v2 models of a vitopt recipe.

A recipe names a timm model, a dataset and an ordered list of stages. Each stage type is one model,
selected by its ``type`` key (a pydantic discriminated union), so the JSON Schema exported by
:func:`vitopt.recipe.recipe_json_schema` tells an editor exactly which keys each stage takes.

Every model forbids unknown keys. Values are checked here (types, ranges, allowed values) and so is
the order of stages (:meth:`Recipe._check_stage_order`); nothing here touches the filesystem or
imports torch, so ``vitopt recipe check`` is fast and runs anywhere.

Relative paths (``output_dir``, ``model.checkpoint``, ``data.root``) are kept as written; they are
relative to the working directory of the run, like timm's training script arguments.

Methods cited by the fields:
    VTP: Zhu, Tang, Han, "Vision Transformer Pruning", 2021, arXiv 2104.08500.
    KD: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015, arXiv 1503.02531.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "GROUPS", "Group", "ModelConfig", "DigitsData", "ImageFolderData", "Cifar10Data", "Cifar100Data", "Augment",
    "DataConfig", "LogConfig", "Auto",
    "TrainingStage", "TrainStage", "SparseTrainStage", "AttentionReg", "SViTEOptions", "S2ViTEOptions",
    "TokenSelectorOptions", "Semi24Options", "SPARSE_METHOD_OPTIONS", "Target", "Shape", "Calibration", "Iterative",
    "PruneStage", "KDConfig",
    "FinetuneStage", "ExportStage", "QuantizeStage", "BuildStage", "ValidateStage", "StageConfig",
    "STAGE_TYPES", "DATA_TYPES",
    "Recipe", "Choices",
]

GROUPS: tuple[str, ...] = ("embed", "heads", "head_dim", "mlp")
"""Prunable group kinds of a timm VisionTransformer, in the order stages report them: the residual
width (``embed``, UP-ViTs) and, per block, heads, head_dim and MLP hidden neurons (the defaults shown
in the schema; the allowed kinds come from :class:`Choices`)."""



@dataclass(frozen=True)
class Choices:
    """The names the registries allow, handed to validation by the caller.

    The recipe package stands aside (it imports no registry), so the caller that knows the registries
    (``vitopt.stages.recipe_choices()``, used by the CLI and the pipeline) passes them as the pydantic
    validation context ``{"choices": Choices(...)}`` (:func:`vitopt.recipe.load_recipe` takes
    ``choices=``). Without choices, names are not checked here and the registries reject unknown
    names when the stage runs.

    Attributes:
        criteria: importance criteria (``prune.criterion``).
        runtimes: runtime kind -> the artifact it runs (``"model"``, ``"onnx"``, ``"engine"``).
        group_kinds: prunable group kinds (``prune.groups``, ``round_to`` / ``min_keep`` keys, VTP groups).
    """

    criteria: tuple[str, ...] = ()
    runtimes: dict[str, str] = field(default_factory=dict)
    group_kinds: tuple[str, ...] = ()


#: what the built-in runtimes run, for stage-order checks made without :class:`Choices`.
_DEFAULT_RUNTIME_NEEDS = {"pytorch": "model", "pytorch-compile": "model", "onnxruntime": "onnx",
                          "onnxruntime-cuda": "onnx", "tensorrt": "engine", "torch-tensorrt": "program"}


def _choices(info: ValidationInfo) -> Choices | None:
    ctx = info.context if isinstance(info.context, dict) else None
    return ctx.get("choices") if ctx else None


def _check_choice(value: Any, allowed: tuple[str, ...] | list[str]) -> Any:
    """Raise a ``literal_error`` (the loader's "is not allowed (allowed: ...)" sentence) unless ``value`` is allowed."""
    if value not in allowed:
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": ", ".join(f"'{a}'" for a in allowed)})
    return value


def _group_kind(value: str, info: ValidationInfo) -> str:
    choices = _choices(info)
    return _check_choice(value, choices.group_kinds) if choices else value


def _block_kind(value: str, info: ValidationInfo) -> str:
    """A per-block width kind (sparse training's gates and masks): every group kind but ``embed`` and depth."""
    choices = _choices(info)
    return _check_choice(value, [k for k in choices.group_kinds if k not in ("embed", "blocks")]) if choices else value


def _criterion(value: str, info: ValidationInfo) -> str:
    choices = _choices(info)
    return _check_choice(value, choices.criteria) if choices else value


def _runtime(value: str, info: ValidationInfo) -> str:
    choices = _choices(info)
    return _check_choice(value, list(choices.runtimes)) if choices else value


#: a group kind (``embed``, ``heads``, ...; checked against :attr:`Choices.group_kinds`).
Group = Annotated[str, AfterValidator(_group_kind)]
#: an importance criterion name (checked against :attr:`Choices.criteria`).
CriterionName = Annotated[str, AfterValidator(_criterion)]
#: a runtime kind (checked against :attr:`Choices.runtimes`).
RuntimeKind = Annotated[str, AfterValidator(_runtime)]

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # safe as one directory name; no '/', no '..'


def _unique(values: list) -> list:
    """Reject an empty list or one with repeated items."""
    if not values:
        raise ValueError("the list is empty (allowed: at least one item)")
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{seen[0]!r} is listed twice (allowed: each item once)")
    return values


GroupList = Annotated[list[Group], AfterValidator(_unique)]
BlockGroup = Annotated[str, AfterValidator(_block_kind)]
BlockGroupList = Annotated[list[BlockGroup], AfterValidator(_unique)]


class _Config(BaseModel):
    """Base of every recipe model: unknown keys are errors; aliased fields accept their name too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# ----------------------------------------------------------------------------- model, data, log


class ModelConfig(_Config):
    """The timm model to optimize, built with ``timm.create_model(name, pretrained, **kwargs)``."""

    name: str = Field(description="timm model name, e.g. 'vit_tiny_patch16_224' or 'deit_small_patch16_224'.")
    kwargs: dict[str, Any] = Field(
        default={}, description="Extra keyword arguments for timm.create_model, e.g. {img_size: 32, depth: 4}.")
    pretrained: bool = Field(
        default=False, description="Load timm's pretrained weights (needs network access or a warm hub cache).")
    checkpoint: Path | None = Field(
        default=None,
        description="Weights to load after building the model (.safetensors, or a torch file read with "
                    "weights_only=True); relative to the working directory.")


class _DataBase(_Config):
    """Fields shared by every dataset type: normalization and loader workers."""

    mean: tuple[float, ...] | None = Field(
        default=None, description="Per-channel mean in [0, 1] pixel units; default: the timm model's pretrained_cfg.")
    std: tuple[Annotated[float, Field(gt=0)], ...] | None = Field(
        default=None, description="Per-channel std in [0, 1] pixel units (each > 0); default: pretrained_cfg.")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes (0 loads in the main process).")


class DigitsData(_DataBase):
    """scikit-learn's embedded 8x8 handwritten digits (10 classes); needs no download."""

    type: Literal["digits"] = Field(default="digits", description="Dataset type tag.")
    val_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Fraction of the images held out (stratified) for validation.")


Auto = Literal["auto"]
"""A setting whose value follows the data (``"auto"``); the rule is in the field's description."""


class Augment(_Config):
    """Training augmentation and evaluation crop through timm's transform factory (``timm.data.create_transform``).

    Train: RandomResizedCrop(``scale``) + horizontal flip + RandAugment (``auto_augment``) + normalize +
    random erasing (``re_prob``); Mixup / CutMix on batches when ``mixup`` / ``cutmix`` > 0 (timm
    ``Mixup``; Zhang et al. 2018, Yun et al. 2019). Eval: resize to size / ``crop_pct`` + center crop.

    ``"auto"`` (the default of the first five) follows the data: images or model inputs whose shorter
    side is <= 64 px are small; small images get ``scale [0.5, 1]``, ``hflip 0``, no RandAugment,
    ``re_prob 0`` and ``crop_pct 1`` (no eval crop); single-channel (gray) images get no flip and no
    RandAugment; other images get DeiT's ImageNet recipe (``rand-m9-mstd0.5-inc1``, ``re_prob 0.25``,
    ``scale [0.08, 1]``, ``hflip 0.5``, the model's ``crop_pct``). ``vitopt recipe check`` prints the values
    in effect and why; DeiT also used ``mixup: 0.8``, ``cutmix: 1.0``.
    """

    auto_augment: str | None = Field(
        default="auto", description="timm auto-augment policy string (RandAugment as in DeiT: 'rand-m9-mstd0.5-inc1'); "
                                    "null: none; 'auto': none for small (<= 64 px) or single-channel images, else "
                                    "'rand-m9-mstd0.5-inc1'.")
    re_prob: Annotated[float, Field(ge=0, le=1)] | Auto = Field(
        default="auto", description="Random erasing probability (Zhong et al. 2020); 'auto': 0 for small (<= 64 px) "
                                    "images, else 0.25.")
    scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] | Auto = Field(
        default="auto", description="Area range of RandomResizedCrop, as fractions of the image; 'auto': [0.5, 1] for "
                                    "small (<= 64 px) images, else [0.08, 1].")
    hflip: Annotated[float, Field(ge=0, le=1)] | Auto = Field(
        default="auto", description="Horizontal flip probability; 'auto': 0 for small (<= 64 px) or single-channel "
                                    "images (a mirrored digit or letter is another class), else 0.5.")
    crop_pct: Annotated[float, Field(gt=0, le=1)] | Auto | None = Field(
        default="auto", description="Eval center-crop fraction (resize to size / crop_pct, crop the center); 'auto': "
                                    "1.0 for small (<= 64 px) images, else the model's pretrained_cfg crop_pct (else "
                                    "0.875); null: always the model's.")
    mixup: float = Field(default=0.0, ge=0, description="Mixup alpha; 0 turns Mixup off.")
    cutmix: float = Field(default=0.0, ge=0, description="CutMix alpha; 0 turns CutMix off.")


class _FileData(_DataBase):
    """Fields of datasets read from files: augmentation and what to do with unreadable images."""

    augment: Augment | None = Field(default_factory=Augment,
                                    description="timm train augmentation / eval crop (defaults follow the data, see "
                                                "Augment); null: plain resize, no augmentation, no eval crop.")
    skip_corrupt: bool = Field(default=False, description="Leave out (and list) image files that cannot be read instead "
                                                          "of stopping with the file's name.")


class ImageFolderData(_FileData):
    """A torchvision ImageFolder tree: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    When the data is loaded (``vitopt recipe check``, and every run before its first stage) the layout
    is checked: both splits, the same class folders, and image files PIL can open (their headers are
    read; a file that is truncated after its header is found when it is decoded, see ``skip_corrupt``).
    """

    type: Literal["imagefolder"] = Field(default="imagefolder", description="Dataset type tag.")
    root: Path = Field(description="Directory holding the train/ and val/ class folders.")
    check_images: Literal["all", "val", "one_per_class"] = Field(
        default="all", description="Which image files to open (header only) before training: 'all' (0.16 ms a file "
                                   "from the page cache on a 2-core VM: 3-4 min for ImageNet-1k's 1.28 M train images, "
                                   "more from a cold or network disk), 'val' (every validation image, and training "
                                   "images until one per class opens), 'one_per_class' (until one per class opens).")


class Cifar10Data(_FileData):
    """CIFAR-10 in its python-pickle layout on disk (``cifar-10-batches-py/data_batch_1..5, test_batch``)."""

    type: Literal["cifar10"] = Field(default="cifar10", description="Dataset type tag.")
    root: Path = Field(description="Folder holding cifar-10-batches-py/ (or that folder itself).")


class Cifar100Data(_FileData):
    """CIFAR-100 in its python-pickle layout on disk (``cifar-100-python/train, test, meta``), fine labels."""

    type: Literal["cifar100"] = Field(default="cifar100", description="Dataset type tag.")
    root: Path = Field(description="Folder holding cifar-100-python/ (or that folder itself).")


DataConfig = Annotated[DigitsData | ImageFolderData | Cifar10Data | Cifar100Data, Field(discriminator="type")]
"""A dataset, chosen by its ``type`` key."""

DATA_TYPES: dict[str, type[_DataBase]] = {"digits": DigitsData, "imagefolder": ImageFolderData,
                                          "cifar10": Cifar10Data, "cifar100": Cifar100Data}


class LogConfig(_Config):
    """Where training curves go besides ``metrics.json`` in the run directory."""

    tensorboard: bool = Field(default=False, description="Also write TensorBoard event files under the run directory.")


# ----------------------------------------------------------------------------- stages


class _StageBase(_Config):
    """Fields every stage has."""

    name: str | None = Field(
        default=None, pattern=_NAME_PATTERN,
        description="Optional label for logs and the stage's folder; unique within the recipe. "
                    "Letters, digits, '.', '_' and '-'.")


class AttentionReg(_Config):
    """Sparse-then-Prune's attention-sparsity regularizer (Prasetyo, Yudistira, Widodo 2023, arXiv 2307.11988).

    Adds ``weight * mean(log(1 + A^2))`` over the softmax attention maps ``A`` to the training loss.
    """

    weight: float = Field(default=1e-2, gt=0, description="Factor of the mean log(1 + A^2) penalty.")
    blocks: Literal["all", "last"] = Field(
        default="all", description="Maps of every block ('all') or of the last block only ('last', as the paper's "
                                   "reference code).")


class TrainingStage(_StageBase):
    """Hyper-parameters shared by stages that run the training loop (AdamW, warmup + cosine decay)."""

    epochs: int = Field(ge=1, description="Number of passes over the training set.")
    batch_size: int = Field(default=64, ge=1, description="Images per optimizer step (global: a torchrun job of N "
                                                          "processes loads batch_size / N per process).")
    lr: float = Field(default=1e-3, gt=0, description="Peak AdamW learning rate, reached after warmup.")
    min_lr: float = Field(default=1e-5, ge=0, description="Learning rate at the end of the cosine decay; <= lr.")
    weight_decay: float = Field(default=0.05, ge=0,
                                description="AdamW decoupled weight decay (not applied to norms and biases).")
    warmup_epochs: float = Field(default=0, ge=0,
                                 description="Linear warmup length in epochs (fractions allowed); <= epochs.")
    label_smoothing: float = Field(default=0.1, ge=0, lt=1, description="Label smoothing of the cross-entropy target.")
    grad_clip: float | None = Field(default=None, gt=0,
                                    description="Clip the global gradient norm to this value; null: no clipping.")
    amp: Literal["bf16", "fp16"] | None = Field(
        default=None, description="Mixed precision of the forward pass: 'bf16' (CUDA or CPU), 'fp16' (CUDA only, "
                                  "with gradient scaling), null: fp32.")
    ema: float | None = Field(default=None, gt=0, lt=1,
                              description="Decay of an exponential moving average of the weights (e.g. 0.9998); "
                                          "the stage ends with the EMA weights. null: no EMA.")
    attention_reg: AttentionReg | None = Field(
        default=None, description="Add Sparse-then-Prune's attention-sparsity penalty (arXiv 2307.11988) to the "
                                  "loss; null: off.")

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainingStage:
        """Raise ValueError when min_lr > lr or warmup_epochs > epochs."""
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must not exceed epochs ({self.epochs})")
        return self


class TrainStage(TrainingStage):
    """Dense training (or fine-tuning a dense model) with cross-entropy."""

    type: Literal["train"] = Field(default="train", description="Stage type tag.")


class SViTEOptions(_Config):
    """SViTE unstructured dynamic sparse training (Chen et al. 2021, arXiv 2106.04533; RigL / SET updates)."""

    density: float = Field(default=0.5, gt=0, lt=1,
                           description="Overall kept fraction of the blocks' Linear weights (SViTE: 0.3-0.5).")
    distribution: Literal["erk", "uniform"] = Field(
        default="erk", description="Per-layer density allocation: Erdos-Renyi-Kernel ('erk') or 'uniform'.")
    growth: Literal["gradient", "random"] = Field(
        default="gradient", description="Regrow by dense-gradient magnitude ('gradient', RigL) or at random ('random', SET).")
    death_rate: float = Field(default=0.5, ge=0, lt=1,
                              description="Initial fraction of active weights dropped and regrown per update; "
                                          "cosine-decayed to 0 at t_end.")
    update_interval: int = Field(default=100, ge=1, description="Optimizer steps between mask updates.")
    t_end: float = Field(default=0.8, gt=0, le=1, description="Fraction of the stage's steps after which masks freeze.")


class S2ViTEOptions(_Config):
    """S2ViTE structured dynamic sparse training of heads and MLP neurons (Chen et al. 2021, arXiv 2106.04533)."""

    head_density: float = Field(default=0.5, gt=0, le=1, description="Kept fraction of heads in every block.")
    mlp_density: float = Field(default=0.5, gt=0, le=1, description="Kept fraction of MLP hidden neurons in every block.")
    death_rate: float = Field(default=0.5, ge=0, lt=1,
                              description="Initial fraction of active units swapped per update; cosine-decayed to 0.")
    update_interval: int = Field(default=100, ge=1, description="Optimizer steps between unit swaps.")
    t_end: float = Field(default=0.8, gt=0, le=1, description="Fraction of the stage's steps after which masks freeze.")


class TokenSelectorOptions(_Config):
    """SViTE+'s learnable token selector (Chen et al. 2021, arXiv 2106.04533): top-k Gumbel-softmax."""

    keep: float = Field(default=0.7, gt=0, lt=1,
                        description="Fraction of patch tokens kept after the selector (the class token is always kept).")
    after_block: int = Field(default=0, ge=0, description="Blocks with index > after_block see only the kept tokens.")
    tau: float = Field(default=1.0, gt=0, description="Gumbel-softmax temperature at the start of the stage.")
    tau_end: float = Field(default=0.1, gt=0, description="Temperature at the end (linear decay).")
    density: float | None = Field(default=None, gt=0, lt=1,
                                  description="Also train unstructured SViTE masks at this density; null: dense weights.")


class Semi24Options(_Config):
    """2:4 semi-structured sparsity for Sparse Tensor Cores (Mishra et al. 2021, arXiv 2104.08378)."""

    layers: Annotated[list[Literal["qkv", "proj", "fc1", "fc2"]], AfterValidator(_unique)] = Field(
        default=["qkv", "proj", "fc1", "fc2"], description="Block Linears converted to 2:4 (non-empty, no repeats).")


#: sparse_train method -> the key of its options block (None: options are the flat VTP keys).
SPARSE_METHOD_OPTIONS: dict[str, str | None] = {"vtp": None, "svite": "svite", "s2vite": "s2vite",
                                                "svite_plus": "svite_plus", "semi24": "semi24"}
_VTP_KEYS = {"lambda_": "lambda", "groups": "groups", "threshold": "threshold", "gate_lr": "gate_lr"}


class SparseTrainStage(TrainingStage):
    """Training-time sparsity; ``method`` picks one, and only that method's options are accepted.

    * ``vtp``: learnable per-unit gates with an L1 penalty (Zhu, Tang, Han 2021, arXiv 2104.08500); options
      ``lambda``, ``groups``, ``threshold``, ``gate_lr``. A later ``prune`` with ``criterion: gate`` ranks
      units by gate magnitude.
    * ``svite``: unstructured DST (SViTE, arXiv 2106.04533); options under ``svite:``.
    * ``s2vite``: structured DST of heads and MLP neurons, ending with surgery (S2ViTE); ``s2vite:``.
    * ``svite_plus``: learnable token selector (SViTE+); ``svite_plus:``.
    * ``semi24``: fixed 2:4 masks for Sparse Tensor Cores; ``semi24:``.

    ``attention_reg`` (Sparse-then-Prune) combines with any method.
    """

    type: Literal["sparse_train"] = Field(default="sparse_train", description="Stage type tag.")
    method: Literal["vtp", "svite", "s2vite", "svite_plus", "semi24"] = Field(
        default="vtp", description="Sparsity method: 'vtp' (arXiv 2104.08500), 'svite' / 's2vite' / 'svite_plus' "
                                   "(arXiv 2106.04533) or 'semi24' (2:4 for Sparse Tensor Cores).")
    lambda_: float = Field(
        default=1e-4, ge=0, alias="lambda",
        description="vtp: weight of the L1 penalty on the gates; VTP (Zhu, Tang, Han 2021, arXiv 2104.08500) uses ~1e-4.")
    groups: BlockGroupList = Field(
        default=["heads", "head_dim", "mlp"], description="vtp: group kinds that get gates (per block: heads, "
                                                          "head_dim, mlp); non-empty, no repeats.")
    threshold: float = Field(
        default=0.05, gt=0, description="vtp: gate magnitude below which a unit counts as 'off' in the logs.")
    gate_lr: float | None = Field(
        default=None, gt=0, description="vtp: learning rate of the gates; null: the stage's lr.")
    svite: SViTEOptions | None = Field(default=None, description="Options of method 'svite' (defaults when omitted).")
    s2vite: S2ViTEOptions | None = Field(default=None, description="Options of method 's2vite' (defaults when omitted).")
    svite_plus: TokenSelectorOptions | None = Field(
        default=None, description="Options of method 'svite_plus' (defaults when omitted).")
    semi24: Semi24Options | None = Field(default=None, description="Options of method 'semi24' (defaults when omitted).")

    @model_validator(mode="after")
    def _method_options(self) -> SparseTrainStage:
        """Reject options that belong to another method; fill in the chosen method's default options."""
        own = SPARSE_METHOD_OPTIONS[self.method]
        if self.method != "vtp":
            given = [yaml for field, yaml in _VTP_KEYS.items() if field in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]!r} is an option of method 'vtp', not {self.method!r} "
                                 f"(allowed: the {own!r} block)")
        for key in ("svite", "s2vite", "svite_plus", "semi24"):
            if key != own and getattr(self, key) is not None:
                raise ValueError(f"{key!r} holds options of method {key!r}, but method is {self.method!r} "
                                 f"(allowed: {'the flat vtp keys lambda, groups, threshold, gate_lr' if own is None else repr(own)})")
        if own is not None and getattr(self, own) is None:
            default = {"svite": SViTEOptions, "s2vite": S2ViTEOptions, "svite_plus": TokenSelectorOptions,
                       "semi24": Semi24Options}[own]()
            object.__setattr__(self, own, default)
        return self

    @property
    def options(self) -> Any:
        """The chosen method's options block (None for ``vtp``, whose options are the flat keys)."""
        own = SPARSE_METHOD_OPTIONS[self.method]
        return None if own is None else getattr(self, own)


class Shape(_Config):
    """An exact target architecture, the same in every block (UP-ViTs' shape recipe, Yu & Wu 2021).

    Example: DeiT-T's shape from DeiT-B is ``{embed: 192, heads: 3, head_dim: 64, mlp: 768}``. Omitted
    dims stay as they are; the criterion decides which units are kept.
    """

    embed: int | None = Field(default=None, ge=1, description="Residual width (embed_dim) to keep.")
    heads: int | None = Field(default=None, ge=1, description="Attention heads to keep in every block.")
    head_dim: int | None = Field(default=None, ge=1, description="Dims per head to keep in every block.")
    mlp: int | None = Field(default=None, ge=1, description="MLP hidden neurons to keep in every block.")
    blocks: int | None = Field(default=None, ge=1, description="Transformer blocks to keep (depth; the criterion "
                                                                "picks which; needs a criterion that scores blocks).")


class Target(_Config):
    """What the pruned model may keep; set exactly one field."""

    flops: float | None = Field(default=None, gt=0, le=1,
                                description="Fraction of the dense model's FLOPs to keep, in (0, 1].")
    params: float | None = Field(default=None, gt=0, le=1,
                                 description="Fraction of the dense model's parameters to keep, in (0, 1].")
    latency_ms: float | None = Field(default=None, gt=0,
                                     description="Latency budget in milliseconds on the runtime of the stage's "
                                                 "latency lookup table (`lut`, from `vitopt measure-lut`).")
    shape: Shape | None = Field(default=None, description="An exact architecture instead of a budget.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        """Raise ValueError unless exactly one of flops, params, latency_ms and shape is set."""
        if sum(v is not None for v in (self.flops, self.params, self.latency_ms, self.shape)) != 1:
            raise ValueError("set exactly one of target.flops, target.params, target.latency_ms or target.shape")
        return self

    @property
    def metric(self) -> str:
        """``"flops"``, ``"params"``, ``"latency_ms"`` or ``"shape"``: which field is set."""
        return next(k for k in ("flops", "params", "latency_ms", "shape") if getattr(self, k) is not None)


class Calibration(_Config):
    """Data for the data-driven criteria (taylor, hessian, kl), drawn from the training split."""

    batches: int = Field(default=8, ge=1, description="Batches averaged by 'taylor' and 'hessian'.")
    batch_size: int = Field(default=64, ge=1, description="Images per calibration batch.")
    per_class: int = Field(default=5, ge=1, description="Proxy images per class for 'kl' (UP-ViTs uses a few).")


class Iterative(_Config):
    """NViT-style iterative pruning: prune a slice of the budget, recover with KD, repeat."""

    rounds: int = Field(default=4, ge=2, description="Prune rounds; each removes an equal share of the cost.")
    train_steps: int = Field(default=50, ge=0, description="KD training steps between rounds.")
    lr: float = Field(default=1e-4, gt=0, description="Peak learning rate of the recovery steps.")
    batch_size: int = Field(default=64, ge=1, description="Batch size of the recovery steps.")


class SearchOptions(_Config):
    """SiDT-style dimension search (Xue et al. 2022, arXiv 2204.07722): gates on every unit trained under a
    FLOPs target with the weights frozen; the final gate magnitudes are the importance."""

    steps: int = Field(default=100, ge=1, description="Gate optimisation steps (calibration batches, cycled).")
    lr: float = Field(default=0.02, gt=0, description="Adam learning rate of the gates.")
    penalty: float = Field(default=5.0, gt=0, description="Weight of |expected FLOPs / dense FLOPs - target| "
                                                          "in the search loss.")


class PruneStage(_StageBase):
    """Structured pruning: score units, allocate a budget, then physically remove the dropped units."""

    type: Literal["prune"] = Field(default="prune", description="Stage type tag.")
    criterion: CriterionName = Field(
        default="taylor", description="Importance of a unit: 'gate' (|gate| from an earlier sparse_train stage, VTP), "
                                  "'l1' (L1 norm of the unit's weights), 'taylor' (|sum w*dL/dw|, Molchanov 2019), "
                                  "'taylor_weights' (sum |w*dL/dw|, Torch-Pruning's group Taylor), "
                                  "'hessian' (NViT's (sum w*dL/dw)^2), 'kl' (UP-ViTs: KL to the unpruned model "
                                  "when the unit alone is removed), 'search' (SiDT-style: gates trained under the "
                                  "FLOPs target; their final magnitudes).")
    search: SearchOptions = Field(default_factory=SearchOptions,
                                  description="Settings of criterion 'search' (its data: calibration.batches "
                                              "batches of calibration.batch_size).")
    target: Target = Field(description="Budget of the pruned model (a fraction of the dense model, a latency "
                                       "in ms, or an exact shape).")
    scope: Literal["global", "uniform", "per_kind"] = Field(
        default="global", description="'global' ranks units of a group kind across all blocks; 'uniform' keeps the "
                                      "same fraction in every block; 'per_kind' keeps one fraction per kind in "
                                      "every block (heads, head_dim, mlp and embed each their own, chosen by "
                                      "importance lost per cost saved).")
    groups: GroupList | None = Field(
        default=None, description="Group kinds to prune; non-empty, no repeats. null: every kind the criterion can "
                                  "price - embed (the residual width, cut consistently as in UP-ViTs), heads, "
                                  "head_dim and mlp (for 'gate': the kinds its gates cover). Depth is opt-in: "
                                  "add 'blocks' (one unit per transformer block; ViT family) to prune width and "
                                  "depth under one budget, e.g. [blocks, heads, mlp].")
    compare: Literal["normalized", "isomorphic", "calibrated", "calibrated_curve"] = Field(
        default="calibrated", description="How units of different kinds compete under one budget: 'normalized' (each "
                                          "kind's scores divided by its mean score, times its mean unit cost), "
                                          "'isomorphic' (every kind gives up the same fraction; ranking only within a "
                                          "kind, Fang et al. ECCV 2024), 'calibrated' (each kind's scores converted to "
                                          "measured loss on the calibration data, then ranked by loss per cost saved), "
                                          "'calibrated_curve' (the same with a measured rate per removal depth, "
                                          "25/50/75% of every group, so deep cuts of one block cost more).")
    min_fraction: dict[Group, Annotated[float, Field(ge=0, le=1)]] = Field(
        default={}, description="Minimum kept fraction of every group of a kind (a per-block floor), e.g. "
                                "{heads: 0.25, mlp: 0.25}.")
    fill: bool = Field(default=True, description="Re-add removed units that still fit under the budget, so the model "
                                                 "lands just under the target instead of one rounded chunk below it.")
    reconstruct: bool = Field(default=False, description="Before each cut, refit the layers that consume removed heads, "
                                                         "head_dim and MLP units (attn.proj, mlp.fc2) by least squares "
                                                         "on the calibration activations (Kwon et al. NeurIPS 2022); "
                                                         "much better one-shot, not better after fine-tuning in "
                                                         "vitopt's benchmark, so off by default.")
    round_to: Annotated[int, Field(ge=1)] | dict[Group, Annotated[int, Field(ge=1)]] | Annotated[
        str, Field(pattern="^auto$")] = Field(
        default=8, description="Kept counts are rounded to multiples of this (tensor-core friendly); an integer "
                               "applies to every group but heads and blocks (they round to 1), a mapping sets it per group; "
                               "'auto' keeps the sizes deploy_target's fused TensorRT kernels accept at "
                               "deploy_precision (vitopt.deploy.kernel_rules).")
    # --- issue 15: kernel-friendly sizes for a deployment target (round_to: auto, LUT target check)
    deploy_target: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Target profile (`vitopt targets`) the pruned model is deployed to; required by round_to: auto, "
                    "and a latency table measured for another target is refused.")
    deploy_precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = Field(
        default="fp16", description="Engine precision on deploy_target (the MHA and GEMM size rules depend on it).")
    # --- end issue 15
    min_keep: dict[Group, Annotated[int, Field(ge=1)]] = Field(
        default={}, description="Minimum units kept per block for each group (default 1).")
    lut: Path | None = Field(default=None, description="Latency lookup table (JSON from `vitopt measure-lut`); "
                                                       "required by target.latency_ms.")
    schedule: Literal["one_shot", "iterative"] = Field(
        default="one_shot", description="'one_shot' prunes to the target at once; 'iterative' prunes in rounds "
                                        "with KD recovery steps between them (NViT).")
    iterative: Iterative = Field(default_factory=Iterative, description="Settings of the iterative schedule.")
    calibration: Calibration = Field(default_factory=Calibration,
                                     description="Data used by the taylor, hessian and kl criteria.")

    @model_validator(mode="after")
    def _consistent(self) -> PruneStage:
        """Raise ValueError for combinations that cannot work."""
        if self.target.latency_ms is not None and self.lut is None:
            raise ValueError("target.latency_ms needs lut: PATH (a table from `vitopt measure-lut`)")
        if self.schedule == "iterative" and self.criterion == "gate":
            raise ValueError("schedule 'iterative' re-scores after every round; gates only score the first "
                             "(allowed criteria: l1, taylor, taylor_weights, hessian, kl)")
        if self.target.shape is not None and self.schedule == "iterative":
            raise ValueError("target.shape is applied in one shot (allowed schedule: one_shot)")
        if self.round_to == "auto" and self.deploy_target is None:             # issue 15
            raise ValueError("round_to: auto needs deploy_target: a target profile such as h100 or orin-agx")
        if self.criterion == "search" and self.target.flops is None and self.target.params is None:
            raise ValueError("criterion 'search' trains its gates towards a cost fraction (allowed targets: "
                             "flops, params)")
        return self

    def round_for(self, group: str) -> int:
        """Rounding multiple of ``group``: heads and blocks 1, others ``round_to`` unless a mapping names them.

        With ``round_to: auto`` this is the plain default (heads 1, others 8); the prune stage replaces it
        by the kernel rules of ``deploy_target`` (the recipe package imports no deploy code)."""
        default = 1 if group in ("heads", "blocks") else 8
        if self.round_to == "auto":
            return default
        if isinstance(self.round_to, dict):
            return self.round_to.get(group, default)
        return 1 if group in ("heads", "blocks") else self.round_to

    def min_keep_for(self, group: str) -> int:
        """Minimum kept units per block for ``group`` (1 unless ``min_keep`` names it)."""
        return self.min_keep.get(group, 1)


class KDConfig(_Config):
    """Knowledge distillation from the model as it was before pruning (Hinton et al. 2015, arXiv 1503.02531).

    Loss: ``(1 - alpha) * CE(student, y) + alpha * tau**2 * KL(softmax(teacher/tau) || softmax(student/tau))``.
    """

    enabled: bool = Field(default=True, description="Distill from the pre-prune model (Hinton et al. 2015).")
    alpha: float = Field(default=0.5, ge=0, le=1,
                         description="Weight of the distillation term; 1 - alpha weights the label loss.")
    tau: float = Field(default=4.0, gt=0,
                       description="Softmax temperature of the distillation term (Hinton et al. 2015).")


class FinetuneStage(TrainingStage):
    """Fine-tuning of the pruned model, with knowledge distillation from the pre-prune model."""

    type: Literal["finetune"] = Field(default="finetune", description="Stage type tag.")
    kd: KDConfig = Field(default_factory=KDConfig, description="Knowledge distillation settings (Hinton et al. 2015).")


class ExportStage(_StageBase):
    """ONNX export of the current model (keeps LayerNormalization, so opset >= 17)."""

    type: Literal["export"] = Field(default="export", description="Stage type tag.")
    opset: int = Field(default=17, ge=17, description="ONNX opset version; >= 17 for LayerNormalization.")
    dynamic_batch: bool = Field(default=True, description="Make the batch dimension dynamic.")
    simplify: bool = Field(default=True, description="Run onnxsim on the exported graph.")


class ValidateStage(_StageBase):
    """Accuracy and latency of the current model on the validation set, per runtime and batch size."""

    type: Literal["validate"] = Field(default="validate", description="Stage type tag.")
    runtimes: Annotated[list[RuntimeKind], AfterValidator(_unique)] = Field(
        default=["pytorch", "onnxruntime"],
            description="Runtimes to measure: 'pytorch' (eager), 'pytorch-compile' (torch.compile), 'onnxruntime' "
                        "(CPU), 'onnxruntime-cuda' (CUDA execution provider) and 'tensorrt'; the ONNX runtimes need "
                        "an earlier export stage, 'tensorrt' an earlier build stage.")
    device: Literal["cpu", "cuda"] = Field(
        default="cpu", description="Device of the PyTorch runtimes; 'cuda' times them with CUDA events.")
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default=[1, 32], min_length=1, description="Batch sizes at which latency is measured.")
    warmup: int = Field(default=10, ge=0, description="Untimed iterations before measuring.")
    repeats: int = Field(default=50, ge=1, description="Timed iterations of a model measured alone (no dense "
                                                        "reference); the report gives median and p90.")
    rounds: int = Field(default=10, ge=1, description="Interleaved rounds (final, dense, final, dense, ...) when the "
                                                      "final model is timed against the dense reference; the report "
                                                      "gives the median of per-round ratios with its min-max.")
    round_ms: float = Field(default=100.0, gt=0, description="Target milliseconds of one model's block of calls in a "
                                                            "round of the interleaved comparison.")
    threads: int = Field(default=2, ge=1, description="CPU threads for the CPU runtimes.")


class QuantizeStage(_StageBase):
    """Post-training quantization of the exported ONNX with NVIDIA ModelOpt (extra ``vitopt[quant]``).

    ``int8``/``fp8`` insert Q/DQ nodes calibrated on training images (TensorRT explicit quantization);
    ``fp16``/``bf16`` convert with ModelOpt AutoCast for strongly typed TensorRT 11 builds. The
    quantized model's ONNX Runtime CPU top-1 is compared with the fp32 model's (int8, fp16).
    """

    type: Literal["quantize"] = Field(default="quantize", description="Stage type tag.")
    precision: Literal["int8", "fp8", "fp16", "bf16"] = Field(
        default="int8", description="'int8' or 'fp8' (Q/DQ PTQ; fp8 needs an sm >= 8.9 target), or 'fp16'/'bf16' "
                                    "(AutoCast conversion for strongly typed TensorRT 11).")
    calibration_images: int = Field(default=512, ge=1,
                                    description="Training images drawn (seeded) to calibrate int8/fp8 scales.")
    calibration_method: Literal["entropy", "max"] = Field(
        default="entropy", description="int8 scale calibration: 'entropy' (KL) or 'max' (fp8 always uses max).")
    calibration_batch: int = Field(default=32, ge=1, description="Images per calibration batch (a static batch, so "
                                                                 "a dynamic-batch ONNX is not calibrated one image "
                                                                 "at a time).")
    high_precision_dtype: Literal["fp16", "fp32"] = Field(
        default="fp16", description="Precision of the ops ModelOpt leaves unquantized (LayerNorm, Softmax, GELU, "
                                    "residual adds): 'fp16' for TensorRT (ModelOpt's default; strong typing keeps it), "
                                    "'fp32' for a graph meant for an ONNX Runtime CPU check.")
    threads: int = Field(default=2, ge=1, description="CPU threads of the ONNX Runtime accuracy check.")


class BuildStage(_StageBase):
    """A TensorRT engine for a target profile (``vitopt targets``), built with the TensorRT Python API from the
    exported ONNX, or a Torch-TensorRT program of the model (``backend: torch_tensorrt``)."""

    type: Literal["build"] = Field(default="build", description="Stage type tag.")
    target: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$",
                        description="Target profile key, e.g. h100, a100, l4, orin-agx, orin-nx, orin-nano.")
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = Field(
        default="fp16", description="Engine precision; int8/fp8 build the Q/DQ model of an earlier quantize stage.")
    trt_major: Literal[10, 11] | None = Field(
        default=None, description="TensorRT major version to build for; null: the installed one (else the "
                                  "target's default).")
    profile: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)] | None = Field(
        default=None, description="Optimization profile batch sizes [min, opt, max]; null: the target's defaults.")
    workspace_mib: int | None = Field(default=None, ge=1,
                                      description="Builder workspace pool in MiB; null: the target's default.")
    opt_level: int = Field(default=3, ge=0, le=5, description="TensorRT builder optimization level (0-5).")
    sparsity: bool = Field(default=False, description="Enable 2:4 sparse weights (SPARSE_WEIGHTS flag).")
    dla_core: int | None = Field(default=None, ge=0,
                                 description="Run on this DLA core with GPU fallback (Orin AGX/NX, TensorRT 10).")
    version_compatible: bool = Field(default=False, description="Build a version-compatible engine.")
    timing_cache: Path | None = Field(
        default=None, description="Timing cache file reused across builds; null: timing_<device>_<sm>_trt<version>"
                                  ".cache in the run directory (one per GPU model and TensorRT build).")
    backend: Literal["tensorrt", "torch_tensorrt"] = Field(
        default="tensorrt", description="'tensorrt': the TensorRT Python API builds the exported ONNX (extra trt); "
                                        "'torch_tensorrt': Torch-TensorRT compiles the PyTorch model into a .ep "
                                        "program for runtime 'torch-tensorrt' (extra torch-tensorrt; fp32/fp16/bf16).")
    dla_min_fraction: float = Field(
        default=0.5, ge=0, le=1, description="DLA builds: refuse the engine when fewer than this fraction of its "
                                             "layers can run on DLA (the rest falls back to the GPU).")


StageConfig = Annotated[
    TrainStage | SparseTrainStage | PruneStage | FinetuneStage | ExportStage | QuantizeStage | BuildStage | ValidateStage,
    Field(discriminator="type"),
]
"""One stage, chosen by its ``type`` key."""

STAGE_TYPES: dict[str, type[_StageBase]] = {
    "train": TrainStage,
    "sparse_train": SparseTrainStage,
    "prune": PruneStage,
    "finetune": FinetuneStage,
    "export": ExportStage,
    "quantize": QuantizeStage,
    "build": BuildStage,
    "validate": ValidateStage,
}


# ----------------------------------------------------------------------------- recipe


def _order_error(index: int, reason: str) -> PydanticCustomError:
    """A stage-order error; the loader reads ``ctx['index']`` to point at ``stages[index]``."""
    return PydanticCustomError(
        "stage_order", "stages[{index}]: {reason}", {"index": index, "reason": reason})


class Recipe(_Config):
    """A complete vitopt run: a model, a dataset and the stages applied to it in order.

    The run directory is ``output_dir / name`` (:attr:`run_dir`).
    """

    name: str = Field(
        default="run", pattern=_NAME_PATTERN,
        description="Run name; the run directory is output_dir/name. Letters, digits, '.', '_' and '-'.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1,
                      description="Seed for Python, NumPy and torch RNGs and the data split.")
    output_dir: Path = Field(default=Path("runs"), description="Parent directory of run directories.")
    model: ModelConfig = Field(description="The timm model to optimize.")
    data: DataConfig = Field(description="The dataset, chosen by its type key.")
    log: LogConfig = Field(default_factory=LogConfig, description="Extra logging outputs.")
    stages: list[StageConfig] = Field(
        min_length=1, description="Stages run in order, each chosen by its type key.")

    @property
    def run_dir(self) -> Path:
        """The directory this run writes to: ``output_dir / name``."""
        return self.output_dir / self.name

    @model_validator(mode="after")
    def _check_stage_order(self, info: ValidationInfo) -> Recipe:
        """Raise a ``stage_order`` error naming ``stages[i]`` when a stage lacks what it needs earlier.

        Rules: ``prune`` with ``criterion: gate`` needs an earlier ``sparse_train``; ``validate`` with
        ``onnxruntime`` needs an earlier ``export``; ``finetune`` with ``kd.enabled`` needs an earlier
        ``prune`` (the teacher is the model before pruning); ``quantize`` and ``build`` need an earlier
        ``export``; an int8/fp8 ``build`` needs an earlier ``quantize`` of that precision; ``validate``
        with ``tensorrt`` needs an earlier ``build`` with ``backend: tensorrt`` and ``torch-tensorrt`` one with
        ``backend: torch_tensorrt``; explicit stage names are unique.
        """
        choices = _choices(info)
        needs = dict(choices.runtimes) if choices else _DEFAULT_RUNTIME_NEEDS
        seen: set[str] = set()
        quant_precisions: set[str] = set()
        names: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            if stage.name is not None:
                if stage.name in names:
                    raise _order_error(i, f"stage name {stage.name!r} is already used by stages[{names[stage.name]}] "
                                          f"(allowed: a unique name)")
                names[stage.name] = i
            if isinstance(stage, PruneStage) and stage.criterion == "gate" and "sparse_train" not in seen:
                raise _order_error(i, "a prune stage with criterion 'gate' needs an earlier sparse_train stage to "
                                      "learn the gates (allowed: criterion 'l1', or a sparse_train stage before it)")
            if isinstance(stage, (QuantizeStage, BuildStage)) and "export" not in seen:
                raise _order_error(i, f"a {stage.type} stage needs an earlier export stage for its ONNX model "
                                      "(allowed: an export stage before it)")
            if (isinstance(stage, BuildStage) and stage.precision in ("int8", "fp8")
                    and stage.precision not in quant_precisions):
                raise _order_error(i, f"a build with precision {stage.precision} needs an earlier quantize stage "
                                      f"with precision {stage.precision} for its Q/DQ model (allowed: add one, "
                                      "or precision fp16)")
            if isinstance(stage, QuantizeStage):
                quant_precisions.add(stage.precision)
            if isinstance(stage, ValidateStage):
                for rt in stage.runtimes:
                    if needs.get(rt) in ("engine", "program") and f"build:{needs[rt]}" not in seen:
                        backend = "tensorrt" if needs[rt] == "engine" else "torch_tensorrt"
                        raise _order_error(i, f"a validate stage with runtime {rt!r} needs an earlier build stage "
                                              f"with backend {backend} (allowed: such a build stage before it, or "
                                              "other runtimes)")
                    if needs.get(rt) == "onnx" and "export" not in seen:
                        raise _order_error(i, f"a validate stage with runtime {rt!r} needs an earlier export stage "
                                              "(allowed: an export stage before it, or runtimes: [pytorch])")
            if isinstance(stage, FinetuneStage) and stage.kd.enabled and "prune" not in seen:
                raise _order_error(i, "a finetune stage with kd.enabled needs an earlier prune stage, because the "
                                      "teacher is the model before pruning (allowed: a prune stage before it, or "
                                      "kd.enabled: false)")
            seen.add(stage.type)
            if isinstance(stage, BuildStage):
                seen.add("build:engine" if stage.backend == "tensorrt" else "build:program")
            if isinstance(stage, SparseTrainStage) and stage.method == "s2vite":
                seen.add("prune")              # S2ViTE ends with surgery and leaves a KD teacher
        return self
