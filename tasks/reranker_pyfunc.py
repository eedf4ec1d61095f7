"""The GR2 reranker as an MLflow pyfunc model (a models-from-code file).

`tasks.registry.register` logs this file with the reranker bundle (model, tokenizer,
catalogue with the SID map, prompt settings; `gr2_core.reranker`) as artifact `reranker` and
`gr2_core` and `data_contracts` as code, so `mlflow.pyfunc.load_model` and `mlflow models serve`
need only the pinned requirements logged with it (torch, transformers, polars, pydantic,
pyyaml, pandera, scipy).

Input: a DataFrame with columns `history` and `candidates` (lists of item ids) and optional
`user_id`. Output: a DataFrame with `recommendations` (the candidates, best first),
`explanation`, `valid` and `reason` (the answer filter's verdict) and `seconds`. A request with an
unknown item, an empty or duplicated candidate list, a missing column, or more rows, candidates
or history items than the bundle's limits (`RerankSettings.max_*`) is refused with
INVALID_PARAMETER_VALUE (HTTP 400 from the scoring server) naming the row and the field.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

COLUMNS = ("history", "candidates")


class GR2RerankerModel(PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's signature
        from gr2_core.reranker import Reranker

        self.reranker = Reranker(context.artifacts["reranker"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):  # noqa: ANN001
        from gr2_core.reranker import RerankRequestError

        missing = [c for c in COLUMNS if c not in model_input.columns]
        if missing:
            raise MlflowException(
                f"input needs columns {list(COLUMNS)} (lists of item ids); missing {missing}, "
                f"got {list(model_input.columns)}",
                INVALID_PARAMETER_VALUE,
            )
        users = model_input["user_id"].tolist() if "user_id" in model_input.columns else None
        try:
            out = self.reranker.rerank(
                model_input["history"].tolist(), model_input["candidates"].tolist(), users
            )
        except RerankRequestError as err:
            raise MlflowException(str(err), INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(out)


mlflow.models.set_model(GR2RerankerModel())
