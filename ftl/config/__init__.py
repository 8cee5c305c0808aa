"""Workflow files: YAML validated into typed sections, with `--set a.b=c` overrides.

One module per group of sections; this package's names are the ones the rest of ftl uses
(`config.load_workflow`, `config.Workflow`, `config.TrainConfig`, ...).
"""

from ftl.config.base import Strict
from ftl.config.finetune import FinetuneConfig
from ftl.config.pipeline import (
                                 ExtractConfig,
                                 FeatureSetConfig,
                                 PipelineConfig,
                                 PredictConfig,
                                 PredictJob,
                                 PreprocessConfig,
)
from ftl.config.sections import SourceConfig, StorageConfig, TrackingConfig
from ftl.config.training import SweepBackbone, SweepConfig, TrainConfig
from ftl.config.workflow import (
                                 STAGE_SECTIONS,
                                 Workflow,
                                 apply_override,
                                 fields_at,
                                 format_error,
                                 load_workflow,
                                 set_key,
                                 to_yaml,
                                 validate,
)
from ftl.errors import WorkflowError
from ftl.secrets import mask_secrets

__all__ = ["ExtractConfig", "FeatureSetConfig", "FinetuneConfig", "PipelineConfig", "PredictConfig", "PredictJob",
           "PreprocessConfig", "STAGE_SECTIONS", "SourceConfig", "StorageConfig", "Strict", "SweepBackbone", "SweepConfig",
           "TrackingConfig", "TrainConfig", "Workflow", "WorkflowError", "apply_override", "fields_at",
           "format_error", "load_workflow", "mask_secrets", "set_key", "to_yaml", "validate"]
