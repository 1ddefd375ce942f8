"""The registered detector as an MLflow pyfunc model, logged as code (this file), not as a pickle.

MLflow runs this file when it loads the model (`mlflow.pyfunc.load_model`, `mlflow models
serve`); the detector is then rebuilt by this package's code from the weights-only model.pt
the model carries (`pipeline.model.load_model`), so nothing in the logged files but this
package's own source is ever executed. Input: one image, float32 CHW in [0, 1]; output: its
boxes (xyxy pixels), scores and labels.
"""
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class RegisteredDetector(PythonModel):
    def load_context(self, context) -> None:
        from pipeline.model import load_model

        (model_path,) = context.artifacts.values()  # the run's model.pt
        self.detector, self.classes, _ = load_model(Path(model_path), torch.device("cpu"))
        self.detector.eval()

    def predict(self, context, model_input, params=None) -> dict[str, np.ndarray]:
        if isinstance(model_input, dict):
            model_input = model_input["image"]
        image = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            (detections,) = self.detector([image])
        return {key: detections[key].numpy() for key in ("boxes", "scores", "labels")}


mlflow.models.set_model(RegisteredDetector())
