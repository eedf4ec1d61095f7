"""The GR2 training pipeline, one line per stage.

Stages pass manifests (paths, hashes, row counts), never frames; each is cached by
(stage config, upstream keys, code version), so a rerun with one changed stage re-runs exactly
that stage and what follows. Run it with `gr2 run --profile demo`, from the Prefect UI through the
deployment in `infra/prefect.yaml`, or as `python -m flows.gr2_pipeline`.
"""

from __future__ import annotations

from prefect import flow

from data_contracts.config import PipelineConfig, load_profile
from data_contracts.manifest import Manifest
from data_contracts.rerankers import MIDTRAIN_RERANK_EVAL, eval_stage, rl_stage, sft_stage
from tasks.baselines import baselines
from tasks.data import data
from tasks.midtrain import midtrain, midtrain_eval, student
from tasks.preranker import candidates, preranker
from tasks.registry import promote, register
from tasks.report import RunResult, publish
from tasks.reranker_eval import reranker_eval
from tasks.rl import rl
from tasks.semantic_ids import embeddings, semantic_ids
from tasks.setup import start_tracking
from tasks.sft import sft
from tasks.split import split
from tasks.traces import traces
from tasks.tracking import fail_parent_hook

FLOW_NAME = "gr2-pipeline"
DEMO = load_profile("demo")  # the form's defaults in the Prefect UI


@flow(name=FLOW_NAME, on_failure=[fail_parent_hook], on_crashed=[fail_parent_hook])
def gr2_pipeline(config: PipelineConfig = DEMO) -> RunResult:
    """Data, split, pre-ranker, slates, baselines, item embeddings, semantic IDs, student,
    SID mid-training and its evaluation, teacher traces, SFT per trace mode and its evaluation,
    DAPO per RL variant and its evaluation; the run's reranker registered as `challenger` in
    the MLflow registry and promoted to `champion` if it is not worse."""
    tracking = start_tracking(config, FLOW_NAME)
    m: dict[str, Manifest] = {}  # stage name -> its output's manifest
    m["data"] = data(config, tracking)
    m["split"] = split(config, m["data"], tracking)
    m["preranker"] = preranker(config, m["data"], m["split"], tracking)
    m["candidates"] = candidates(config, m["split"], m["preranker"], tracking)
    m["baselines"] = baselines(config, m["split"], m["candidates"], tracking)
    collaborative = m["preranker"] if config.embeddings.with_collaborative else None
    m["embeddings"] = embeddings(config, m["data"], tracking, collaborative)
    m["semantic_ids"] = semantic_ids(config, m["embeddings"], m["split"], tracking)
    m["student"] = student(config, m["semantic_ids"], tracking)
    slates = (m["data"], m["split"], m["semantic_ids"], m["candidates"])  # what rerankers see
    m["midtrain"] = midtrain(config, *slates[:3], m["student"], tracking)
    m["midtrain_eval"] = midtrain_eval(config, *slates, m["midtrain"], tracking)
    modes = config.teacher.modes  # empty: no teacher, no SFT
    if modes:
        m["traces"] = traces(config, *slates, tracking)
    scored: dict[str, str] = {}  # trained reranker stage -> its evaluation stage

    def evaluate(model: str, evaluation: str | None = None) -> None:
        evaluation = evaluation or eval_stage(model)
        m[evaluation] = reranker_eval(config, evaluation, *slates, m[model], tracking)
        scored[model] = evaluation

    for mode in modes:
        m[sft_stage(mode)] = sft(config, mode, *slates[:3], m["traces"], m["midtrain"], tracking)
        evaluate(sft_stage(mode))
    for variant in config.rl.variants:  # each starts from its SFT model (checked by the config)
        start = m[sft_stage(config.rl.sft_mode(variant))]
        m[rl_stage(variant)] = rl(config, variant, *slates, start, tracking)
        evaluate(rl_stage(variant))
    candidate = config.registry_candidate() if config.registry.enabled else None
    if candidate == "midtrain":  # no SFT in this run: the mid-trained student reranks
        evaluate("midtrain", MIDTRAIN_RERANK_EVAL)
    decision = ""
    if candidate is not None:
        registered = register(config, m[candidate], m[scored[candidate]], *slates, tracking)
        if config.registry.promote:
            decision = promote(config, registered, tracking)
    result = publish(config, tracking, list(m.values()))  # the manifests, where it is tracked
    return result.model_copy(update={"promotion": decision})


if __name__ == "__main__":
    gr2_pipeline(DEMO)
