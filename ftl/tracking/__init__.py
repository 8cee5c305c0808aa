"""MLflow: the only package that talks to it. Runs and lineage (runs), earlier runs (lookup), models (models)."""

from ftl.tracking.lookup import find_extraction, find_finetune, find_probes, find_training
from ftl.tracking.models import (
                                 BACKBONE_REQUIREMENTS,
                                 COMPOSED_REQUIREMENTS,
                                 SHIPPED_CODE,
                                 composed_requirements,
                                 load_classifier,
                                 log_composed,
                                 log_head,
                                 model_code,
                                 model_folder,
                                 requirements,
                                 tag_version,
)
from ftl.tracking.runs import (
                                 DEFAULT_URI,
                                 EXPERIMENT_KIND,
                                 KIND_TAG,
                                 child,
                                 connect,
                                 feature_dataset,
                                 flatten,
                                 log_dataset,
                                 log_extraction,
                                 log_file,
                                 log_history,
                                 log_history_batch,
                                 log_metrics,
                                 log_params,
                                 log_text,
                                 resume,
                                 run_link,
                                 set_tags,
                                 setup,
                                 start,
                                 temp_dir,
                                 unreachable,
                                 uri_of,
)

__all__ = ["BACKBONE_REQUIREMENTS", "COMPOSED_REQUIREMENTS", "DEFAULT_URI", "composed_requirements", "EXPERIMENT_KIND", "KIND_TAG", "SHIPPED_CODE", "child", "connect",
           "feature_dataset", "find_extraction", "find_finetune", "find_probes", "find_training", "flatten",
           "load_classifier", "log_composed", "log_dataset", "log_extraction", "log_file", "log_head", "log_history",
           "log_history_batch", "log_metrics", "log_params", "log_text", "model_code", "model_folder", "requirements",
           "resume", "run_link", "set_tags", "setup", "start", "tag_version", "temp_dir", "unreachable", "uri_of"]
