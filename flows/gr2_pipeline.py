"""The GR2 training pipeline, one line per stage.

Stages pass manifests (paths, hashes, row counts), never frames; each is cached by
(stage config, upstream keys, code version), so a rerun with one changed stage re-runs exactly
that stage and what follows. Run it with `gr2 run --profile demo`, from the Prefect UI through the
deployment in `infra/prefect.yaml`, or as `python -m flows.gr2_pipeline`.
"""

from __future__ import annotations

from prefect import flow

from data_contracts.config import PipelineConfig, load_profile
from tasks.data import load_data
from tasks.evaluate import evaluate_baselines, publish
from tasks.midtrain import evaluate_midtrain, midtrain, provision_student
from tasks.preranker import generate_candidates, train_preranker
from tasks.registry import promote, register_reranker
from tasks.reranker_eval import evaluate_reranker
from tasks.rl import rl
from tasks.semantic_ids import build_semantic_ids, embed_items
from tasks.setup import start_tracking
from tasks.sft import sft
from tasks.split import split_sequences
from tasks.traces import generate_traces
from tasks.tracking import fail_parent_hook

FLOW_NAME = "gr2-pipeline"
DEMO = load_profile("demo")  # the form's defaults in the Prefect UI


@flow(name=FLOW_NAME, on_failure=[fail_parent_hook], on_crashed=[fail_parent_hook])
def gr2_pipeline(config: PipelineConfig = DEMO) -> dict[str, str]:
    """Data, split, pre-ranker, slates, baselines, item embeddings, semantic IDs, student,
    SID mid-training and its evaluation, teacher traces, SFT per trace mode and its evaluation,
    DAPO per RL variant and its evaluation; the run's reranker registered as `challenger` in
    the MLflow registry and promoted to `champion` if it is not worse."""
    tracking = start_tracking(config, FLOW_NAME)
    data = load_data(config, tracking)
    split = split_sequences(config, data, tracking)
    preranker = train_preranker(config, data, split, tracking)
    candidates = generate_candidates(config, split, preranker, tracking)
    baselines = evaluate_baselines(config, split, candidates, tracking)
    collaborative = preranker if config.embeddings.with_collaborative else None
    embeddings = embed_items(config, data, tracking, collaborative)
    semantic_ids = build_semantic_ids(config, embeddings, split, tracking)
    student = provision_student(config, semantic_ids, tracking)
    midtrained = midtrain(config, data, split, semantic_ids, student, tracking)
    midtrain_eval = evaluate_midtrain(
        config, data, split, semantic_ids, candidates, midtrained, tracking
    )
    stages = [data, split, preranker, candidates, baselines, embeddings, semantic_ids]
    stages += [student, midtrained, midtrain_eval]
    modes = config.teacher.modes  # empty: no teacher, no SFT
    if modes:
        traces = generate_traces(config, data, split, semantic_ids, candidates, tracking)
        stages.append(traces)
    slates = (data, split, semantic_ids, candidates)  # what a reranker is trained/evaluated on
    tuned, trained = {}, {}  # trained: reranker stage -> (model, its evaluation)
    for mode in modes:
        tuned[mode] = sft(config, mode, data, split, semantic_ids, traces, midtrained, tracking)
        scored = evaluate_reranker(config, f"sft_eval_{mode}", *slates, tuned[mode], tracking)
        stages += [tuned[mode], scored]
        trained[f"sft_{mode}"] = (tuned[mode], scored)
    for variant in config.rl.variants:  # each starts from its SFT model (checked by the config)
        policy = rl(config, variant, *slates, tuned[config.rl.sft_mode(variant)], tracking)
        scored = evaluate_reranker(config, f"rl_eval_{variant}", *slates, policy, tracking)
        stages += [policy, scored]
        trained[f"rl_{variant}"] = (policy, scored)
    decision = ""
    if config.registry.enabled:
        candidate = config.registry_candidate()
        if candidate == "midtrain":  # no SFT in this run: the mid-trained student reranks
            stage = "midtrain_rerank_eval"
            scored = evaluate_reranker(config, stage, *slates, midtrained, tracking)
            stages.append(scored)
            trained["midtrain"] = (midtrained, scored)
        model, scored = trained[candidate]
        registered = register_reranker(config, model, scored, *slates, tracking)
        if config.registry.promote:
            decision = promote(config, registered, tracking)
    return publish(config, tracking, stages) | {"promotion": decision}


if __name__ == "__main__":
    gr2_pipeline(DEMO)
