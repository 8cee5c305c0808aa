"""Make the model `ftl predict` serves in the benchmark: the benchmark's backbone and a random 10-class head.

Saved as MLflow saves a registered composed model (ftl.tracking.log_composed), but into a local
folder: `ftl predict --model <folder>` loads it without a tracking server. Prints `BENCH {"model": path}`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contenders import common

CLASSES = [f"class{i}" for i in range(10)]


def main() -> None:
    s = common.settings()
    import mlflow.pyfunc
    import torch

    from ftl import config, tracking
    from ftl.extract import stage
    from ftl.model import classifier, heads, weights

    spec, prov = stage.model_spec(config.validate(common.workflow_data(s), source="benchmark"))
    layer = prov.layers[0]
    torch.manual_seed(0)
    head = heads.Head(layer.dim, len(CLASSES))
    where = Path(s["output"])
    folder = classifier.save(str(where / "files"), head=head, backbone=weights.load(spec.backbone, spec.weights,
                                                                                   size=spec.preprocess.crop),
                             provenance=prov.to_dict(), layer={"name": layer.name, "pooling": layer.pooling},
                             classes=CLASSES)
    with tempfile.TemporaryDirectory(prefix="ftl-code-") as tmp:
        mlflow.pyfunc.save_model(str(where / "model"), loader_module="ftl.model.classifier", data_path=folder,
                                 code_paths=[tracking.model_code(tmp)],
                                 pip_requirements=tracking.requirements(*tracking.composed_requirements(spec.backbone)))
    common.report(model=str(where / "model"))


if __name__ == "__main__":
    main()
