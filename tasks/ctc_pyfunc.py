"""The CTC summarizer as an MLflow pyfunc model (a models-from-code file).

`tasks.registry.ctc_register` logs this file with the trained summarizer folder as artifact
`summarizer` and `gr2_core` as code, so `mlflow.pyfunc.load_model` (or `mlflow models serve`)
needs only torch and transformers. Input: a DataFrame with column `document` and optional
`aspect`; params `method` (greedy / beam), `length` (greedy length control, 0 = off), `beam`.
Output: a DataFrame with column `summary`.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class CTCSummarizerModel(PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's signature
        from gr2_core.summarization.ctc import Summarizer

        self.summarizer = Summarizer.load(context.artifacts["summarizer"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):  # noqa: ANN001
        from gr2_core.summarization.ctc import DecodeOptions

        if "document" not in model_input.columns:
            raise MlflowException(
                f"input needs a 'document' column; got {list(model_input.columns)}",
                INVALID_PARAMETER_VALUE,
            )
        docs = model_input["document"].fillna("").astype(str).tolist()
        empty = [i for i, d in enumerate(docs) if not d.strip()]
        if empty:
            raise MlflowException(f"empty document in row(s) {empty}", INVALID_PARAMETER_VALUE)
        conditions = self.summarizer.spec.conditions
        if "aspect" in model_input.columns:
            aspects = model_input["aspect"].fillna(conditions[0]).astype(str).tolist()
        else:
            aspects = [conditions[0]] * len(docs)
        params = params or {}
        length = int(params.get("length") or 0) or None
        opts = DecodeOptions(
            method=str(params.get("method", "greedy")),
            length=length,
            beam=int(params.get("beam", 8)),
        )
        try:
            out = self.summarizer.summarize(docs, aspects, opts)
        except ValueError as err:  # unknown aspect or decoding method
            raise MlflowException(str(err), INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame({"summary": out})


mlflow.models.set_model(CTCSummarizerModel())
