"""The registered student as an MLflow pyfunc: image, instruction and proprioception in, actions out."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

POLICY_ARTIFACT = "policy"


class StudentPolicyModel(mlflow.pyfunc.PythonModel):
    """Input rows: `image` (H*W*3 uint8 values, row-major HWC), `instruction` (str), `proprio` (floats)."""

    def load_context(self, context: Any) -> None:
        from pipeline.evaluate.policy import Policy

        self.policy = Policy(context.artifacts[POLICY_ARTIFACT])
        size = self.policy.model.cfg.image_size
        self.image_shape = (size, size, 3)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        missing = [c for c in ("image", "instruction", "proprio") if c not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks column(s) {missing}; send image, instruction and proprio per row")
        images = np.stack([self._image(v, i) for i, v in enumerate(model_input["image"])])
        proprio = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in model_input["proprio"]])
        actions = self.policy.act(images, [str(s) for s in model_input["instruction"]], proprio)
        return pd.DataFrame({"action": [a.tolist() for a in actions]})

    def _image(self, value: Any, row: int) -> np.ndarray:
        array = np.asarray(value, dtype=np.float32)
        if array.size != int(np.prod(self.image_shape)):
            raise ValueError(f"row {row}: image has {array.size} values; this policy expects "
                             f"{self.image_shape[0]}x{self.image_shape[1]}x3 = {int(np.prod(self.image_shape))}")
        return array.reshape(self.image_shape).clip(0, 255).astype(np.uint8)
