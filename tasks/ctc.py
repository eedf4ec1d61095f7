"""Stages of the CTC summarization flow: `ctc_data`, `ctc_train`, `ctc_eval` (registration is
`tasks.registry.ctc_register`, the report `tasks.report.ctc_publish`).

Same protocol as the reranker stages (`tasks.stage.Stage`): content-addressed output folders,
one MLflow child run per stage execution, Prefect caching on the stage key.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from data_contracts.ctc import CTCFlowConfig
from data_contracts.manifest import Manifest, sha256_file
from gr2_core.summarization import ctc, data, evaluate
from gr2_core.summarization.data import aclsum_dir
from tasks.runners import map_task, shard_count
from tasks.stage import Stage
from tasks.tracking import Tracking


def _fingerprint(config: CTCFlowConfig) -> dict[str, str]:
    """Content hash of the input file(s), so an edited corpus invalidates the stage."""
    d = config.data
    if d.source == "jsonl":
        path = Path(d.jsonl_path or "")
        return {"jsonl": sha256_file(path) if path.exists() else "absent"}
    return {s: sha256_file(aclsum_dir() / f"{s}.jsonl") for s in ("train", "val", "test")}


DATA = Stage("ctc_data", lambda c: c.data, __name__, _fingerprint, core=data.__name__)
TRAIN = Stage("ctc_train", lambda c: c.ctc, __name__, core=ctc.__name__)
EVAL = Stage("ctc_eval", lambda c: c.evaluation, __name__, core=evaluate.__name__)


@task(name="ctc_data", cache_key_fn=DATA.cache_key_fn, persist_result=True)
def ctc_data(config: CTCFlowConfig, tracking: Tracking) -> Manifest:
    """Read and check the (document, summary) pairs of every split."""

    def body(out: Path, run):
        return data.run(config.data, out, get_run_logger())

    return DATA.run(config, [], tracking, body)


@task(name="ctc_train", cache_key_fn=TRAIN.cache_key_fn, persist_result=True)
def ctc_train(config: CTCFlowConfig, pairs: Manifest, tracking: Tracking) -> Manifest:
    """Fit the CTC summarizer; resumes from the last finished epoch after a crash."""
    inputs = ctc.CTCTrainInputs(pairs.path("pairs"), config.data.max_source_words)

    def body(out: Path, run):
        return ctc.run(inputs, config.ctc, out, run.log_metrics, get_run_logger())

    return TRAIN.run(config, [pairs], tracking, body)


@task(name="ctc_eval", cache_key_fn=EVAL.cache_key_fn, persist_result=True)
def ctc_eval(
    config: CTCFlowConfig, pairs: Manifest, model: Manifest, tracking: Tracking
) -> Manifest:
    """CTC (greedy, length-controlled greedy, beam), Lead-N and the zero-shot LLM on the test
    split, clean and with simulated ASR noise."""
    inputs = evaluate.CTCEvalInputs(
        pairs.path("pairs"), model.path("model"), config.data.max_source_words, config.data.seed
    )

    runner = config.runner
    shards = shard_count(runner)

    def on_runner(parts: list[evaluate.CTCEvalShard]) -> list:
        return map_task(ctc_eval_shard, [{"shard": p} for p in parts], runner, len(parts))

    def body(out: Path, run):
        return evaluate.run(inputs, config.evaluation, out, get_run_logger(), on_runner, shards)

    return EVAL.run(config, [pairs, model], tracking, body)


@task(task_run_name="ctc-eval-shard-{shard.index}")
def ctc_eval_shard(shard: evaluate.CTCEvalShard):
    """One shard of the test pairs scored by every system, where the runner puts it (Ray)."""
    return evaluate.score_shard(shard)
