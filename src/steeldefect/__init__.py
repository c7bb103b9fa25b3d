"""steeldefect: transfer-learned, quantized CNN classifiers for steel surface defects.

The public Python API, by the short names a user looks for. Each is loaded on first use, so
``import steeldefect`` stays cheap: predicting with a model file never imports TensorFlow.

- study (over a run folder): :func:`train`, :func:`export`, :func:`evaluate`, :func:`reproduce`,
  :func:`write_report`, :func:`learning_curve`
- data: :func:`scan_dataset`, :func:`load_images`, :func:`read_image`, :func:`inspect_dataset`
- a deployed model file: :class:`Classifier`, :func:`read_model_info`, :class:`ModelInfo`,
  :func:`predict_paths`, :func:`score_archive`
- the service: :func:`create_app`

The layers, bottom to top: ``core`` -> ``runtime`` -> ``data`` -> ``models`` -> ``deploy`` ->
``study`` and ``serve``; a module imports only its own layer and those below it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "train": "steeldefect.study.pipeline",
    "export": "steeldefect.study.pipeline",
    "evaluate": "steeldefect.study.pipeline",
    "reproduce": "steeldefect.study.pipeline",
    "write_report": "steeldefect.study.report",
    "learning_curve": "steeldefect.study.learningcurve",
    "scan_dataset": "steeldefect.data.dataset",
    "load_images": "steeldefect.data.loading",
    "read_image": "steeldefect.data.decode",
    "inspect_dataset": "steeldefect.data.inspection",
    "Classifier": "steeldefect.runtime.modelfile",
    "ModelInfo": "steeldefect.runtime.modelfile",
    "read_model_info": "steeldefect.runtime.modelfile",
    "predict_paths": "steeldefect.deploy.predict",
    "score_archive": "steeldefect.deploy.batch",
    "create_app": "steeldefect.serve.service",
}

__all__ = [
    "__version__",
    "train",
    "export",
    "evaluate",
    "reproduce",
    "write_report",
    "learning_curve",
    "scan_dataset",
    "load_images",
    "read_image",
    "inspect_dataset",
    "Classifier",
    "ModelInfo",
    "read_model_info",
    "predict_paths",
    "score_archive",
    "create_app",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time each name loads on first use
    from steeldefect.data.dataset import scan_dataset
    from steeldefect.data.decode import read_image
    from steeldefect.data.inspection import inspect_dataset
    from steeldefect.data.loading import load_images
    from steeldefect.deploy.batch import score_archive
    from steeldefect.deploy.predict import predict_paths
    from steeldefect.runtime.modelfile import Classifier, ModelInfo, read_model_info
    from steeldefect.serve.service import create_app
    from steeldefect.study.learningcurve import learning_curve
    from steeldefect.study.pipeline import evaluate, export, reproduce, train
    from steeldefect.study.report import write_report


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'steeldefect' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
