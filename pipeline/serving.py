"""The MLflow model of a fine-tuned classifier, logged as code (MLflow's models-from-code).

``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"classifier": <folder>})`` stores
this file's text and the classifier's own folder (``model.json`` and ``seed<k>.pt`` plain
state_dicts); nothing is pickled. Loading the model (``mlflow models serve``,
``mlflow.pyfunc.load_model``) runs this file, which imports the installed ``pipeline`` package,
and reads the weights with ``torch.load(weights_only=True)`` (:func:`pipeline.models.classifier
.load`). So serving trusts the code of the installed package and this file, never the bytes of
a weight file (docs/reliability.md, "Untrusted files").

Input: N x H x W x C uint8 pixels, already at the classifier's size (``model.json``'s
``image_size``). Output: per image the most probable class and its probability, then the
probability of every class, computed exactly as ``python -m pipeline predict`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipeline.models import classifier
from pipeline.predict import probabilities_of


class Classifier(PythonModel):
    """A pipeline classifier behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        self.module, self.description = classifier.load(Path(context.artifacts["classifier"]))
        self.classes = list(self.description["classes"])

    def predict(self, context: Any, model_input: Any, params: dict | None = None) -> Any:
        pixels = np.asarray(model_input, dtype=np.uint8)
        probabilities = probabilities_of(self.module, self.description, pixels).numpy()
        best = probabilities.argmax(axis=1)
        table = pd.DataFrame(
            {
                "class": [self.classes[i] for i in best],
                "probability": probabilities.max(axis=1).astype(float),
            }
        )
        for index, name in enumerate(self.classes):
            table[f"p_{name}"] = probabilities[:, index].astype(float)
        return table


mlflow.models.set_model(Classifier())
