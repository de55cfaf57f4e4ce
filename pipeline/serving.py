"""The MLflow model of a fine-tuned classifier, logged as code (MLflow's models-from-code).

``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"classifier": <folder>})`` stores
this file's text and the classifier's own folder (``model.json`` and ``seed<k>.pt`` plain
state_dicts); nothing is pickled. Loading the model (``mlflow models serve``,
``mlflow.pyfunc.load_model``) runs this file, which imports the installed ``pipeline`` package,
and reads the weights with ``torch.load(weights_only=True)`` (:func:`pipeline.models.classifier
.load`). So serving trusts the code of the installed package and this file, never the bytes of
a weight file (docs/reliability.md, "Untrusted files").

Input: N x H x W x C uint8 pixels, already at the classifier's size (``model.json``'s
``image_size``), as the logged signature (:func:`signature`) says. Output: per image the most
probable class and its probability, then the probability of every class, computed exactly as
``python -m pipeline predict`` does.

Over HTTP the request is checked before MLflow parses it (:func:`checked_invocations`), because
MLflow's scoring server casts a JSON tensor to the signature's dtype before it enforces the
signature: a normalized float image (values in [0, 1]) would become all zeros and be answered
with a confident wrong class. Floats are refused, not rescaled: the signature says uint8, MLflow
itself refuses float arrays in a Python call, and a float image's scale ([0, 1] or 0..255)
cannot be told from its values alone (an all-dark image is both).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema, TensorSpec

from pipeline.models import classifier
from pipeline.predict import probabilities_of

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel
    from mlflow.pyfunc.scoring_server import InvocationsResponse

    # MLflow's handler: (body, content type, model, input schema) -> response
    Invocations = Callable[
        [bytes | str, str | None, PyFuncModel, Schema | None], InvocationsResponse
    ]

#: The JSON keys of MLflow's scoring protocol that carry a tensor; the others are DataFrames
#: (which MLflow reshapes and casts to the tensor's dtype without a check) or LLM formats.
TENSOR_KEYS = ("inputs", "instances")


def signature(description: dict[str, Any]) -> ModelSignature:  # Any: model.json as parsed
    """The served contract of a classifier described by ``model.json``: N x H x W x C uint8
    images in (as ``pipeline predict`` reads them), then ``class``, ``probability`` and one
    ``p_<class>`` per class out. MLflow stores it with the model and enforces it on every call."""
    size, channels = description["image_size"], description["in_channels"]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, channels))]),
        outputs=Schema(
            [
                ColSpec("string", "class"),
                ColSpec("double", "probability"),
                *(ColSpec("double", f"p_{name}") for name in description["classes"]),
            ]
        ),
    )


@dataclass(frozen=True)
class ImageContract:
    """What a request must hold: integer pixels 0..255 in an N x H x W x C array. JSON has no
    uint8, so integers in range are the JSON form of uint8; anything else is named back."""

    height: int
    width: int
    channels: int

    @classmethod
    def of_schema(cls, schema: Schema | None) -> ImageContract | None:
        """The contract of a signature that is one unnamed N x H x W x C uint8 tensor (ours);
        None for any other model, whose requests are left to MLflow."""
        if schema is None or not schema.is_tensor_spec() or len(schema.inputs) != 1:
            return None
        spec = schema.inputs[0]
        if spec.name is not None or spec.type != np.dtype(np.uint8) or len(spec.shape) != 4:
            return None
        batch, height, width, channels = spec.shape
        if batch != -1 or min(height, width, channels) < 1:
            return None
        return cls(height, width, channels)

    @property
    def expected(self) -> str:
        """The contract in words, the first half of every refusal."""
        return (
            f"expected uint8 images of shape N x {self.height} x {self.width} x {self.channels}"
            " (integer pixel values 0..255)"
        )

    def problem(self, images: object) -> str | None:
        """Why ``images`` (nested lists from JSON, or an array) break the contract, naming the
        expected and the received dtype and shape; None when they keep it. Never the values."""
        if isinstance(images, dict | str | int | float | bool) or images is None:
            return f"{self.expected}, got a JSON {_json_kind(images)}, not nested lists"
        try:
            array = np.asarray(images)
        except ValueError:  # numpy refuses ragged nesting
            return f"{self.expected}, got nested lists of uneven lengths"
        if array.size == 0:
            return f"{self.expected}, got no images"
        shape = " x ".join(map(str, array.shape)) or "scalar"
        got = f"{_dtype_words(array.dtype)} {shape}"
        if array.dtype.kind == "f":
            low, high = float(array.min()), float(array.max())
            advice = (
                "scale [0, 1] images to round(255 * x)"
                if low >= 0.0 and high <= 1.0
                else "send whole numbers 0..255"
            )
            return f"{self.expected}, got {got} with values in [{low:g}, {high:g}]: {advice}"
        if array.dtype.kind not in "iu":
            return f"{self.expected}, got {got}"
        image = (self.height, self.width, self.channels)
        if array.shape == image:
            return f"{self.expected}, got {got}: wrap one image in a list"
        if array.ndim != 4 or array.shape[1:] != image:
            return f"{self.expected}, got {got}"
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            return f"{self.expected}, got {got} with values in [{low}, {high}]"
        return None

    def request_problem(self, body: bytes | str, content_type: str | None) -> str | None:
        """Why an HTTP request to ``/invocations`` breaks the contract, read from the body as
        the client sent it (before MLflow casts it); None when it keeps it."""
        example = f'send {{"inputs": [...]}} as application/json; {self.expected}'
        mime = (content_type or "").split(";")[0].strip().lower()
        if mime != "application/json":
            return f"this model takes JSON, got Content-Type {mime or '(none)'}: {example}"
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            return f"the request body is not JSON ({error}): {example}"
        if not isinstance(payload, dict):
            return f"the request body is a JSON {_json_kind(payload)}: {example}"
        keys = sorted(payload.keys() - {"params"})
        if len(keys) != 1 or keys[0] not in TENSOR_KEYS:
            return f"the request body has the keys {keys}: {example}"
        return self.problem(payload[keys[0]])


def _json_kind(value: object) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _dtype_words(dtype: np.dtype) -> str:
    """A dtype as a client would say it: numpy's name for numbers, words for the rest."""
    return {"U": "strings", "S": "bytes", "O": "mixed values", "b": "bool"}.get(
        dtype.kind, str(dtype)
    )


def checked_invocations(invocations: Invocations) -> Invocations:
    """MLflow's request handler with the image contract checked first, on the request body.

    MLflow's scoring server parses a JSON tensor with ``np.array(values, dtype=<signature's>)``
    and only then enforces the signature, so a float image in [0, 1] passes as all zeros and a
    negative pixel as 0; and its schema errors quote the whole array back. Refused here instead,
    with a 400 that names the expected and the received shape and dtype. Models whose signature
    is not an N x H x W x C uint8 tensor pass through untouched.
    """

    @functools.wraps(invocations)
    def checked(
        data: bytes | str, content_type: str | None, model: PyFuncModel, input_schema: Schema | None
    ) -> InvocationsResponse:
        contract = ImageContract.of_schema(input_schema)
        if contract is not None and (problem := contract.request_problem(data, content_type)):
            raise MlflowException(problem, error_code=INVALID_PARAMETER_VALUE)
        return invocations(data, content_type, model, input_schema)

    checked.checks_images = True  # type: ignore[attr-defined]
    return checked


def _guard_scoring_server() -> None:
    """Put :func:`checked_invocations` in front of MLflow's scoring server, once per process.

    Loading the model is the one moment this file runs inside ``mlflow models serve``; the
    server looks ``invocations`` up at each request, so the wrapper sees every one. Where
    MLflow has no such handler the model refuses to load rather than serve unchecked."""
    from mlflow.pyfunc import scoring_server

    handler = getattr(scoring_server, "invocations", None)
    if handler is None:
        raise RuntimeError(
            f"mlflow {mlflow.__version__} has no mlflow.pyfunc.scoring_server.invocations, so"
            " pipeline/serving.py cannot check requests before MLflow casts them to uint8;"
            " install the MLflow version pinned in requirements.lock"
        )
    if not getattr(handler, "checks_images", False):
        scoring_server.invocations = checked_invocations(handler)


class Classifier(PythonModel):
    """A pipeline classifier behind MLflow's pyfunc interface."""

    def load_context(self, context: PythonModelContext) -> None:
        """Load the classifier (weights only) and check requests in front of MLflow's server."""
        self.module, self.description = classifier.load(Path(context.artifacts["classifier"]))
        self.classes = list(self.description["classes"])
        size = self.description["image_size"]
        self.contract = ImageContract(size, size, self.description["in_channels"])
        _guard_scoring_server()

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> pd.DataFrame:
        """Class and probabilities per image. MLflow has enforced the signature by now; checked
        again so that a direct call can never cast a float image to zeros either."""
        if problem := self.contract.problem(model_input):
            raise MlflowException(problem, error_code=INVALID_PARAMETER_VALUE)
        pixels = np.asarray(model_input).astype(np.uint8)  # integers 0..255: exact
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
