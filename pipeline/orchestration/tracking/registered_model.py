"""The registered detector as an MLflow pyfunc model, logged as code (this file), not as a pickle.

MLflow runs this file when it loads the model (`mlflow.pyfunc.load_model`, `mlflow models
serve`); the detector is then rebuilt by this package's code from the weights-only model.pt
the model carries (`pipeline.model.load_model`), so nothing in the logged files but this
package's own source is ever executed. The class names and the preprocessing (the detector's
own resize and normalisation) travel in model.pt.

Input: a column `image` of encoded image files (JPEG, PNG, ...; base64 strings in a JSON request,
which MLflow decodes for a binary column). Output: per image, `boxes` (xyxy pixels), `scores`,
`labels` (0-based) and `names`, each image on its own, so an answer never depends on what else
the request held.
"""
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

OUTPUT_COLUMNS = ("boxes", "scores", "labels", "names")


class RegisteredDetector(PythonModel):
    def load_context(self, context) -> None:
        from pipeline.model import load_model

        (model_path,) = context.artifacts.values()  # the run's model.pt
        # The limits on a request's image are those the model was trained with.
        self.detector, self.classes, self.trained, _ = load_model(Path(model_path), torch.device("cpu"))
        self.detector.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from pipeline.images import ImageLimits
        from pipeline.inference.detection import detect
        from pipeline.inference.inputs import decode

        rows, limits = [], ImageLimits.of(self.trained.data)
        for index, encoded in enumerate(model_input["image"]):
            image = decode(bytes(encoded), f"image {index}", limits)
            (found,) = detect(self.detector, [image], torch.device("cpu"))
            rows.append((found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(),
                         found.names(self.classes)))
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(RegisteredDetector())
