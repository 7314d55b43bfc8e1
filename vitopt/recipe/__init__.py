"""Recipes: the pydantic schema of a vitopt run and its YAML loader.

``load_recipe(path, overrides)`` reads a YAML recipe, applies ``--set`` overrides and returns a
validated :class:`Recipe`; every problem is a :class:`~vitopt.errors.VitoptError` of the form
``FILE:LINE: KEY.PATH: what was wrong (allowed: ...).``
"""

from vitopt.recipe.loader import apply_overrides, dump_resolved, format_path, load_recipe, recipe_json_schema
from vitopt.recipe.schema import (
    DATA_TYPES,
    GROUPS,
    STAGE_TYPES,
    Choices,
    DataConfig,
    DigitsData,
    ExportStage,
    FinetuneStage,
    Group,
    ImageFolderData,
    KDConfig,
    LogConfig,
    ModelConfig,
    PruneStage,
    Recipe,
    SparseTrainStage,
    StageConfig,
    Target,
    TrainingStage,
    TrainStage,
    ValidateStage,
)

__all__ = [
    "Recipe", "Choices", "load_recipe", "recipe_json_schema", "dump_resolved", "apply_overrides", "format_path",
    "STAGE_TYPES", "DATA_TYPES", "GROUPS", "Group", "StageConfig", "DataConfig",
    "TrainingStage", "TrainStage", "SparseTrainStage", "PruneStage", "Target", "FinetuneStage",
    "KDConfig", "ExportStage", "ValidateStage", "ModelConfig", "DigitsData", "ImageFolderData",
    "LogConfig",
]
