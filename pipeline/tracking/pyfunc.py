"""The registered student as an MLflow pyfunc: image, instruction and proprioception in, actions out.

A request is three named tensors (the model's signature): `image` B x H x W x 3 uint8, `instruction` B strings,
`proprio` B x P float32. In process, pass a dict of numpy arrays; over REST (`mlflow models serve`), the
standard `{"inputs": {"image": [...], "instruction": [...], "proprio": [...]}}` or `{"instances": [...]}`
JSON, which MLflow turns into the same arrays. The answer is a B x A float32 array of actions in the data's
units. A request the policy cannot answer raises MLflow's INVALID_PARAMETER_VALUE (HTTP 400) naming the field.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.models.checkpoint import PolicyCard

POLICY_ARTIFACT = "policy"
FIELDS = ("image", "instruction", "proprio")
EXAMPLE_INSTRUCTION = "reach to the goal position"


def policy_signature(card: PolicyCard) -> ModelSignature:
    """The tensors a request carries and the answer's, sized from the policy's own config."""
    vla = card.vla or {}
    size, proprio, action = vla["image_size"], vla["proprio_dim"], vla["action_dim"]
    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), "image"),
                     TensorSpec(np.dtype(str), (-1,), "instruction"),
                     TensorSpec(np.dtype(np.float32), (-1, proprio), "proprio")])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, action), "action")]))


def input_example(card: PolicyCard) -> dict[str, np.ndarray]:
    """One request of the right shapes: a mid-grey frame, a task's instruction, the data's mean proprio."""
    vla = card.vla or {}
    size = vla["image_size"]
    instruction = next(iter((card.instructions or {}).values()), EXAMPLE_INSTRUCTION)
    return {"image": np.full((1, size, size, 3), 128, dtype=np.uint8),
            "instruction": np.array([instruction]),
            "proprio": np.asarray([card.normalizer["proprio_mean"]], dtype=np.float32)}


def _bad(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE is what MLflow's scoring server answers with HTTP 400 (and keeps serving).
    return MlflowException.invalid_parameter_value(message)


def _columns(frame: pd.DataFrame) -> dict[str, Any]:
    """A DataFrame request (a model registered before signatures, or a caller's choice): one array per field."""
    return {name: np.stack([np.asarray(v) for v in frame[name]]) if name != "instruction"
            else frame[name].to_numpy() for name in FIELDS if name in frame.columns}


def request_arrays(request: Any, image_shape: tuple[int, int, int], proprio_dim: int
                   ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Check a request field by field and give the policy its arrays; every problem names its field."""
    fields = _columns(request) if isinstance(request, pd.DataFrame) else request
    if not isinstance(fields, dict):
        raise _bad(f"a request is a mapping of {', '.join(FIELDS)} to arrays, got {type(request).__name__}")
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise _bad(f"request lacks field(s) {', '.join(missing)}; send image (B x {image_shape[0]} x "
                   f"{image_shape[1]} x 3 uint8), instruction (B strings) and proprio (B x {proprio_dim} float32)")
    image = np.asarray(fields["image"])
    if image.ndim == 2 and image.shape[1] == int(np.prod(image_shape)):   # flattened rows (DataFrame cells)
        image = image.reshape(-1, *image_shape)
    if image.ndim != 4 or image.shape[1:] != image_shape:
        raise _bad(f"image has shape {image.shape}; this policy takes B x {image_shape[0]} x {image_shape[1]} x 3 "
                   f"uint8 frames (resize the camera image to {image_shape[0]}x{image_shape[1]})")
    proprio = np.asarray(fields["proprio"], dtype=np.float32)
    if proprio.ndim != 2 or proprio.shape[1] != proprio_dim:
        raise _bad(f"proprio has shape {proprio.shape}; this policy takes B x {proprio_dim} floats")
    if not np.isfinite(proprio).all():
        rows = np.flatnonzero(~np.isfinite(proprio).all(1)).tolist()
        raise _bad(f"proprio row(s) {rows} hold NaN or inf; send finite proprioception")
    instructions = np.asarray(fields["instruction"]).reshape(-1).tolist()
    if not len(image) == len(instructions) == len(proprio):
        raise _bad(f"image, instruction and proprio hold {len(image)}, {len(instructions)} and {len(proprio)} "
                   f"rows; send one of each per request row")
    if image.dtype != np.uint8:
        if np.isnan(image).any() or image.min() < 0 or image.max() > 255:
            raise _bad("image values must be pixel values in [0, 255] (uint8)")
        image = image.astype(np.uint8)
    return image, [str(s) for s in instructions], proprio


class StudentPolicyModel(mlflow.pyfunc.PythonModel):
    """The policy behind `models:/NAME@champion`: see the module docstring for the request."""

    # MLflow reads predict's type hints as a signature of its own, and has none for a dict of arrays: predict's
    # input is left unannotated and MLflow's hint check is skipped (it warns at import otherwise). The logged
    # signature is what says what a request holds.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from pipeline.evaluate.policy import Policy

        self.policy = Policy(context.artifacts[POLICY_ARTIFACT])
        size = self.policy.model.cfg.image_size
        self.image_shape = (size, size, 3)
        self.proprio_dim = self.policy.model.cfg.proprio_dim

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> np.ndarray:  # noqa: ANN001
        images, instructions, proprio = request_arrays(model_input, self.image_shape, self.proprio_dim)
        return self.policy.act(images, instructions, proprio)
