"""The MLflow pyfunc form of a trained Retro, logged from code by ``tracking.log_retro_model``.

MLflow runs this file when it loads the model; ``load_context`` rebuilds the model from the
``model.safetensors`` artifact (weights + RetroConfig, no pickle). ``predict`` takes
``{"tokens": int [b, n], "neighbors": int [b, l, k, r] (optional)}`` and returns logits [b, n, V].
"""

from __future__ import annotations

import mlflow
from mlflow.models import set_model


class RetroPyfunc(mlflow.pyfunc.PythonModel):
    """Retro behind MLflow's pyfunc interface; ``.model`` is the torch module itself."""

    _skip_type_hint_validation = True
    """Inputs are a free-form dict of arrays: no MLflow schema validation (and no warning about it)."""

    def load_context(self, context) -> None:
        """Load the weights and config from the ``model`` artifact folder."""
        from retro_model.checkpoint import load_model_dir

        self.model, self.extra = load_model_dir(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        """Logits [b, n, V] (numpy) of ``model_input["tokens"]`` with its optional neighbours."""
        import torch

        tokens = torch.as_tensor(model_input["tokens"], dtype=torch.long)
        neighbors = model_input.get("neighbors")
        with torch.no_grad():
            logits, _ = self.model(
                tokens, None if neighbors is None else torch.as_tensor(neighbors, dtype=torch.long)
            )
        return logits.float().numpy()


set_model(RetroPyfunc())
