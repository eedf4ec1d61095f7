"""`gr2`: run the pipeline, check your own data files, list profiles.

gr2 run --profile demo                      # the embedded default
gr2 run --config my.yaml --set preranker.epochs=3
gr2 ctc --profile demo [--doc docs/results.md] # the CTC summarization experiments
gr2 promote --profile demo [--version N]      # challenger (or version N) vs champion
gr2 rollback --profile demo                  # champion back to previous-champion
gr2 serve --profile demo [--port 5001]       # serve the champion over HTTP (MLflow scoring server)
gr2 validate --interactions i.csv --items items.csv [--users users.csv]
gr2 profiles
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml


def _parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def _run_flow(flow_fn, config, refresh: bool) -> tuple[dict, float]:
    """Run a flow, print its report; (result, wall seconds)."""
    if refresh:  # Prefect reads this setting when each task runs
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    start = time.perf_counter()
    result = flow_fn(config)
    seconds = time.perf_counter() - start
    print()
    print(result["report"])
    return result, seconds


def cmd_run(args: argparse.Namespace) -> int:
    from data_contracts.config import load_profile

    config = load_profile(args.config or args.profile, _parse_sets(args.set))
    from flows.gr2_pipeline import gr2_pipeline

    result, seconds = _run_flow(gr2_pipeline, config, args.refresh)
    print(f"Flow wall time: {seconds:.0f} s")
    if args.doc:
        from gr2_core.report import replace_section

        command = "gr2 " + " ".join(argv_for_doc(args))
        body = result["report"].split("\n", 2)[2]  # drop the report's own title
        heading = f"Baselines, {config.data.dataset} (profile {config.profile})"
        note = f"Command: `{command}` (flow wall time {seconds:.0f} s on {os.cpu_count()} cores)."
        replace_section(Path(args.doc), heading, f"{note}\n\n{body}", "Results")
        print(f"Wrote section '{heading}' of {args.doc}")
        if result.get("reranker_report"):
            heading = f"Rerankers, {config.data.dataset} (profile {config.profile})"
            text = (
                f"Command: `{command}`. Every trained reranker of the run and the pre-ranker "
                "order on the same slates (`sft.eval_slates` per split): conditional = slates "
                "that contain the target; end_to_end = all slates of the split (the "
                "pre-ranker's coverage x conditional, both resampled for the interval); n = "
                "slates decoded. Value [95% bootstrap CI]; invalid answers count as misses; "
                "seconds = generation time per slate. `constrained`: the list decoded as a "
                "permutation of the slate (what the registered model serves).\n\n"
                f"{result['reranker_report']}"
            )
            replace_section(Path(args.doc), heading, text, "Results")
            print(f"Wrote section '{heading}' of {args.doc}")
    if result.get("midtrain_report"):
        print(result["midtrain_report"])
    if args.midtrain_doc and result.get("midtrain_report"):
        from gr2_core.report import replace_section

        command = "gr2 " + " ".join(argv_for_doc(args, "--midtrain-doc", args.midtrain_doc))
        body = result["midtrain_report"].split("\n", 2)[2]
        heading = f"Student next-item retrieval, {config.data.dataset} (profile {config.profile})"
        seconds_by_stage = result.get("stage_seconds", {})
        timed = ", ".join(
            f"{s} {seconds_by_stage[s]:.0f} s"
            for s in ("student", "midtrain", "midtrain_eval")
            if seconds_by_stage.get(s) is not None
        )
        note = (
            f"Command: `{command}`"
            + (f" (stage wall time on {os.cpu_count()} cores: {timed})" if timed else "")
            + "."
        )
        replace_section(Path(args.midtrain_doc), heading, f"{note}\n\n{body}", "Benchmarks")
        print(f"Wrote section '{heading}' of {args.midtrain_doc}")
    if result.get("reranker_report"):
        summary = traces_summary(result.get("traces", {}))
        print(f"Teacher traces:\n{summary}\n\nRerankers:\n{result['reranker_report']}")
        if args.sft_doc:
            from gr2_core.report import replace_section

            command = "gr2 " + " ".join(argv_for_doc(args, "--sft-doc", args.sft_doc))
            heading = (
                f"Teacher traces and SFT rerankers, {config.data.dataset} "
                f"(profile {config.profile})"
            )
            secs = result.get("stage_seconds", {})
            timed = ", ".join(
                f"{s} {v:.0f} s"
                for s, v in secs.items()
                if v is not None and (s == "traces" or s.startswith(("sft", "rl")))
            )
            body = (
                f"Command: `{command}` (stage wall time on {os.cpu_count()} cores: {timed}).\n\n"
                f"Teacher acceptance (a slate is accepted when one attempt passes the filter with "
                f"the target first):\n\n{summary}\n\nTeacher outputs: "
                f"{result.get('traces_digest', '')}.\n\nRerankers on conditional slates, value "
                f"[95% bootstrap CI]; invalid answers count as misses; seconds = generation time "
                f"per slate:\n\n{result['reranker_report']}\n"
            )
            replace_section(Path(args.sft_doc), heading, body, "Benchmarks")
            print(f"Wrote section '{heading}' of {args.sft_doc}")
    if result.get("rl_report"):
        print(f"DAPO:\n{result['rl_report']}")
        if args.rl_doc:
            write_rl_doc(args, config, result)
    if result.get("promotion"):
        print(result["promotion"])
    print(
        f"MLflow: tracking URI {result['tracking_uri']}, experiment {result['experiment_id']}, "
        f"run {result['mlflow_run_id']}"
    )
    print(
        "Browse runs: `make ui`, then Prefect at http://127.0.0.1:4200 and MLflow at "
        f"http://127.0.0.1:5000/#/experiments/{result['experiment_id']}/runs/{result['mlflow_run_id']}"
    )
    return 0


def write_rl_doc(args: argparse.Namespace, config, result: dict) -> None:
    """The DAPO section of `args.rl_doc`: curves figure, training and test comparison tables."""
    from gr2_core.plots import rl_curves
    from gr2_core.report import replace_section

    doc = Path(args.rl_doc)
    figure = doc.parent / "img" / f"rl_{config.data.dataset}_{config.profile}.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    runs = {stage.replace("_", "-", 1): h for stage, h in result["rl_histories"].items()}
    rl_curves(runs, figure)
    command = "gr2 " + " ".join(argv_for_doc(args, "--rl-doc", args.rl_doc))
    secs = result.get("stage_seconds", {})
    timed = ", ".join(
        f"{s} {v:.0f} s" for s, v in secs.items() if v is not None and s.startswith("rl")
    )
    rl = config.rl
    heading = f"DAPO runs, {config.data.dataset} (profile {config.profile})"
    sampling = f"on ({rl.max_sampling_rounds} extra rounds)" if rl.dynamic_sampling else "off"
    body = (
        f"Command: `{command}` (stage wall time on {os.cpu_count()} cores: {timed}). "
        f"{rl.max_steps} steps of {rl.prompts_per_step} groups x {rl.group_size} rollouts, "
        f"lr {rl.lr:g}, temperature {rl.temperature:g}, up to {rl.max_completion_length} "
        f"completion tokens, dynamic sampling {sampling}, {rl.slates} training slates.\n\n"
        f"![DAPO curves]({figure.relative_to(doc.parent).as_posix()})\n\n"
        f"{result['rl_report']}\n"
    )
    replace_section(doc, heading, body, "DAPO")
    print(f"Wrote section '{heading}' of {doc} and {figure}")


def traces_summary(metrics: dict[str, float]) -> str:
    """Markdown table of the teacher's acceptance per mode from the traces stage metrics."""
    modes = sorted({k.split("/")[0] for k in metrics if k.endswith("/slates")})
    lines = [
        "| mode | slates | attempts | accepted slates | slate acceptance | attempt acceptance "
        "| rejections |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        reasons = ", ".join(
            f"{k.split('/', 2)[2]} {v:.0f}"
            for k, v in sorted(metrics.items())
            if k.startswith(f"{m}/rejected/")
        )
        lines.append(
            f"| {m} | {metrics[f'{m}/slates']:.0f} | {metrics[f'{m}/attempts']:.0f} | "
            f"{metrics[f'{m}/accepted_slates']:.0f} | {metrics[f'{m}/slate_acceptance']:.3f} | "
            f"{metrics[f'{m}/attempt_acceptance']:.3f} | {reasons or '-'} |"
        )
    return "\n".join(lines)


def argv_for_doc(
    args: argparse.Namespace, flag: str = "--doc", doc: str | None = None, command: str = "run"
) -> list[str]:
    """The run command as a user would type it again."""
    out = (
        [command, "--config", args.config] if args.config else [command, "--profile", args.profile]
    )
    out += [f"--set {s}" for s in args.set]
    return [*out, flag, doc or args.doc]


def cmd_ctc(args: argparse.Namespace) -> int:
    from data_contracts.ctc import load_ctc_profile

    config = load_ctc_profile(args.config or args.profile, _parse_sets(args.set))
    from flows.ctc_summarization import ctc_summarization

    result, seconds = _run_flow(ctc_summarization, config, args.refresh)
    print(f"Flow wall time: {seconds:.0f} s; registered model version {result['model_version']}")
    if args.doc:
        from gr2_core.report import replace_section

        command = "gr2 " + " ".join(argv_for_doc(args, command="ctc"))
        source = config.data.source if config.data.source == "jsonl" else "ACLSum"
        overrides = "".join(f", {s}" for s in args.set)  # a variant gets its own section
        heading = f"CTC summarization, {source} test (profile {config.profile}{overrides})"
        secs = ", ".join(
            f"{s} {v:.0f} s" for s, v in result["stage_seconds"].items() if v is not None
        )
        note = (
            f"Command: `{command}` (flow wall time {seconds:.0f} s on {os.cpu_count()} cores; "
            f"stages: {secs or 'cached'}). Mean [95% bootstrap CI] over test pairs; the "
            "intervals are clustered by document: each resample draws documents (papers) with "
            "all their pairs (aspects), which are not independent; order = "
            "Kendall tau between summary order and the source positions of its words; "
            "summaries/s and latency one document at a time. Simulated ASR noise: word "
            "deletions, substitutions and insertions at the given rate (seeded), not real ASR."
        )
        replace_section(Path(args.doc), heading, f"{note}\n\n{result['report']}", "Results")
        print(f"Wrote section '{heading}' of {args.doc}")
    if result.get("promotion"):
        print(result["promotion"])
    print(
        f"MLflow: tracking URI {result['tracking_uri']}, experiment {result['experiment_id']}, "
        f"run {result['mlflow_run_id']}"
    )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from data_contracts.config import DataConfig
    from data_contracts.tables import ContractError
    from gr2_core.data import DataErrors, load_tables, preprocess, resolve_sources

    cfg = DataConfig(
        dataset="custom",
        interactions_path=args.interactions,
        items_path=args.items,
        users_path=args.users,
        min_user_interactions=args.min_user_interactions,
        min_item_interactions=args.min_item_interactions,
    )
    sources = resolve_sources(cfg)
    try:
        raw = load_tables(sources)
        tables = preprocess(raw, cfg, str(sources.interactions))
    except (ContractError, DataErrors, FileNotFoundError) as err:
        print(f"INVALID\n{err}", file=sys.stderr)
        return 1
    users = tables.users.height if tables.users is not None else 0
    print(
        f"OK: {raw.interactions.height} interactions, {raw.items.height} items, {users} users; "
        f"after the {cfg.min_user_interactions}/{cfg.min_item_interactions}-core filter: "
        f"{tables.interactions.height} interactions, "
        f"{tables.interactions['user_id'].n_unique()} users, {tables.items.height} items"
    )
    return 0


def _config(args: argparse.Namespace):
    from data_contracts.config import load_profile

    return load_profile(args.config or args.profile, _parse_sets(args.set))


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.registry import gr2_promote

    print(gr2_promote(_config(args), args.version or ""))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from tasks.registry import CHAMPION, rollback
    from tasks.tracking import resolve_uri

    config = _config(args)
    try:
        old, new = rollback(resolve_uri(config), config.registry.model_name)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{config.registry.model_name}: {CHAMPION} moved from version {old} back to {new}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Replace this process with `mlflow models serve` on the alias (no extra environment)."""
    from tasks.tracking import resolve_uri

    config = _config(args)
    uri = f"models:/{config.registry.model_name}@{args.alias}"
    bindir = str(Path(sys.executable).parent)
    env = os.environ | {
        "MLFLOW_TRACKING_URI": resolve_uri(config),
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",  # the server runs uvicorn
    }
    print(f"serving {uri} from {env['MLFLOW_TRACKING_URI']} on http://{args.host}:{args.port}")
    print(
        f"  curl -s http://{args.host}:{args.port}/invocations -H 'Content-Type: application/json' "
        '-d \'{"dataframe_records": [{"history": ["<item id>", ...], "candidates": [...]}]}\''
    )
    mlflow = str(Path(bindir) / "mlflow")
    cmd = [mlflow, "models", "serve", "-m", uri, "--env-manager", "local"]
    cmd += ["-h", args.host, "-p", str(args.port), "--workers", "1"]
    os.execve(mlflow, cmd, env)
    return 0  # not reached


def cmd_profiles(_: argparse.Namespace) -> int:
    from data_contracts.config import PROFILES_DIR
    from data_contracts.ctc import CTC_PROFILES_DIR

    for flag, folder in (("run", PROFILES_DIR), ("ctc", CTC_PROFILES_DIR)):
        print(f"gr2 {flag} --profile ...")
        for path in sorted(folder.glob("*.yaml")):
            first = path.read_text().splitlines()[0].lstrip("# ")
            print(f"  {path.stem:10s} {first}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gr2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the GR2 pipeline flow")
    run.add_argument("--profile", default="demo", help="a profile in infra/configs/ (default demo)")
    run.add_argument("--config", help="a YAML config file (overrides --profile)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. preranker.epochs=3 (repeatable)",
    )
    run.add_argument("--refresh", action="store_true", help="ignore cached stage results")
    run.add_argument(
        "--doc", help="also write the metrics table as a section of this markdown file"
    )
    run.add_argument(
        "--midtrain-doc",
        help="also write the student's next-item table as a section of this markdown file",
    )
    run.add_argument(
        "--sft-doc",
        help="also write the teacher acceptance and SFT reranker tables as a section of this file",
    )
    run.add_argument(
        "--rl-doc",
        help="also write the DAPO curves (a PNG under img/ beside it) and the RL comparison "
        "tables as a section of this markdown file",
    )
    run.set_defaults(func=cmd_run)
    ctc = sub.add_parser("ctc", help="run the CTC summarization flow")
    ctc.add_argument("--profile", default="demo", help="a profile in infra/configs/ctc/")
    ctc.add_argument("--config", help="a YAML config file (overrides --profile)")
    ctc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ctc.add_argument("--refresh", action="store_true", help="ignore cached stage results")
    ctc.add_argument("--doc", help="also write the results table as a section of this file")
    ctc.set_defaults(func=cmd_ctc)
    for name, func, text in (
        ("promote", cmd_promote, "decide on the challenger (or --version) against the champion"),
        ("rollback", cmd_rollback, "move the champion alias back to previous-champion"),
        ("serve", cmd_serve, "serve a registered reranker alias over HTTP (127.0.0.1)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--profile", default="demo", help="the profile whose registry to use")
        cmd.add_argument("--config", help="a YAML config file (overrides --profile)")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        cmd.set_defaults(func=func)
        if name == "promote":
            cmd.add_argument("--version", help="registered version (default: the challenger)")
        if name == "serve":
            cmd.add_argument("--alias", default="champion")
            cmd.add_argument("--host", default="127.0.0.1")
            cmd.add_argument("--port", type=int, default=5001)
    val = sub.add_parser("validate", help="check your own data files against the contracts")
    val.add_argument("--interactions", required=True)
    val.add_argument("--items", required=True)
    val.add_argument("--users")
    val.add_argument("--min-user-interactions", type=int, default=5)
    val.add_argument("--min-item-interactions", type=int, default=5)
    val.set_defaults(func=cmd_validate)
    prof = sub.add_parser("profiles", help="list the config profiles")
    prof.set_defaults(func=cmd_profiles)
    args = parser.parse_args(argv)
    if os.environ.get("PREFECT_HOME"):  # Prefect does not create missing parents itself
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
