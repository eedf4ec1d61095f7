"""The CTC summarization experiments (SPEC section 7), a flow of their own beside `gr2_pipeline`.

Pairs -> CTC summarizer -> evaluation against Lead-N and a zero-shot LLM (clean and with
simulated ASR noise) -> registered model. Run it with `gr2 ctc --profile demo`, from the Prefect
UI through the deployment in `infra/prefect.yaml`, or as `python -m flows.ctc_summarization`.
"""

from __future__ import annotations

from prefect import flow

from data_contracts.ctc import CTCFlowConfig, load_ctc_profile
from tasks.ctc import ctc_data, ctc_eval, ctc_train
from tasks.registry import ctc_register
from tasks.report import RunResult, ctc_publish
from tasks.setup import start_tracking
from tasks.tracking import fail_parent_hook_for

FLOW_NAME = "ctc-summarization"
DEMO = load_ctc_profile("demo")  # the form's defaults in the Prefect UI
_on_failure = fail_parent_hook_for(CTCFlowConfig)


@flow(name=FLOW_NAME, on_failure=[_on_failure], on_crashed=[_on_failure])
def ctc_summarization(config: CTCFlowConfig = DEMO) -> RunResult:
    """ACLSum (or your JSONL) pairs, CTC summarizer training, evaluation against Lead-N and a
    zero-shot LLM on clean and noisy test documents, registration in the MLflow registry."""
    tracking = start_tracking(config, FLOW_NAME)
    pairs = ctc_data(config, tracking)
    model = ctc_train(config, pairs, tracking)
    scored = ctc_eval(config, pairs, model, tracking)
    version = ctc_register(config, model, tracking)
    result = ctc_publish(config, tracking, [pairs, model, scored])
    return result.model_copy(update={"model_version": version})


if __name__ == "__main__":
    ctc_summarization(DEMO)
