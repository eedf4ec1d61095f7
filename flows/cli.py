"""`gr2`: run the pipeline, check your own data files, list profiles.

gr2 run --profile demo                      # the embedded default
gr2 run --config my.yaml --set preranker.epochs=3
gr2 ctc --profile demo [--doc docs/results.md] # the CTC summarization experiments
gr2 report --profile demo --doc docs/results.md # a finished run's tables into docs, no rerun
gr2 promote --profile demo [--version N]      # challenger (or version N) vs champion
gr2 rollback --profile demo                  # champion back to previous-champion
gr2 serve --profile demo [--port 5001]       # serve the champion over HTTP (MLflow scoring server)
gr2 validate --interactions i.csv --items items.csv [--users users.csv]
gr2 profiles
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import yaml

from tasks.scoring_server import GRACEFUL_S, MAX_BODY_BYTES, MAX_WAITING

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class UsageError(Exception):
    """A mistake on the command line or in a file the user gave, said so they can fix it."""


class ServerDown(UsageError):
    """A server the command needs does not answer: `what` names it, `fix` says what to do,
    `server` is "prefect" or "mlflow"."""

    def __init__(self, what: str, fix: str, server: str = ""):
        super().__init__(f"{what}; {fix}")
        self.what, self.fix, self.server = what, fix, server


# servers found lost during this process's run (`console` ends the process at once after one)
LOST: set[str] = set()


def config_message(err: BaseException) -> str:
    """What to tell the user about a config that cannot be loaded: each bad field with its value,
    or the YAML file and line, or the missing profile."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        lines = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(the whole config)"
            got = f" (got {e['input']!r})" if e["type"] != "missing" else ""
            lines.append(f"  {field}: {e['msg']}{got}")
        return f"invalid config ({err.title}):\n" + "\n".join(lines)
    if isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        return f"broken YAML in {where or 'a config file'}: {problem}"
    return str(err)


def _load(loader, args: argparse.Namespace):
    """The command's config (`--config` or `--profile`, then every `--set`); a config the user
    got wrong is a UsageError naming the field, file or line."""
    from pydantic import ValidationError

    from data_contracts.config import ProfileError

    try:
        return loader(args.config or args.profile, _parse_sets(args.set))
    except (ValidationError, yaml.YAMLError, ProfileError, FileNotFoundError) as err:
        raise UsageError(config_message(err)) from err


def _parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE (e.g. preranker.epochs=3), got {pair!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UsageError(f"--set {pair}: the value is not YAML ({err})") from err
    return out


def _check_data_files(config) -> None:
    """The files a custom dataset names exist, before any stage starts."""
    if config.data.dataset != "custom":
        return
    for field in ("interactions_path", "items_path", "users_path"):
        path = getattr(config.data, field)
        if path and not Path(path).is_file():
            raise UsageError(
                f"data.{field}: no such file {path!r} (relative paths start in {Path.cwd()}); "
                "check it with `gr2 validate`"
            )


def _check_writable(config) -> None:
    """The artifacts root can be created and written, before any stage starts."""
    import tempfile

    root = Path(config.artifacts_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as err:
        raise UsageError(
            f"artifacts_root: cannot write to {str(root)!r} ({err.strerror or err}); choose "
            "another with --set artifacts_root=PATH"
        ) from err


def _check_servers(config, prefect: bool = True) -> None:
    """The Prefect API (with `prefect`) and the MLflow tracking server, where they are servers,
    answer now: a run against one that is down would fail after its first stages (or wait on
    retries)."""
    import httpx
    from prefect.settings import get_current_settings

    from tasks.tracking import resolve_uri

    checks = []
    api = (os.environ.get("PREFECT_API_URL") or get_current_settings().api.url) if prefect else ""
    if api:
        fix = "start it (`make ui`), or unset PREFECT_API_URL to run with a temporary local API"
        checks.append(("Prefect API", str(api).rstrip("/") + "/health", "PREFECT_API_URL", fix))
    uri = resolve_uri(config)
    if uri.startswith(("http://", "https://")):
        fix = "start it (`make ui`), or point tracking.tracking_uri at a running one"
        # the setting the URI came from, in resolve_uri's order (a stage sets the variable
        # while it runs, so the environment alone cannot tell)
        where = "tracking.tracking_uri" if config.tracking.tracking_uri else "MLFLOW_TRACKING_URI"
        checks.append(("MLflow tracking server", uri.rstrip("/") + "/health", where, fix))
    for name, url, setting, fix in checks:
        try:  # any HTTP answer means a server is there (auth, paths are its business)
            httpx.get(url, timeout=10)
        except httpx.HTTPError as err:
            where = url.rsplit("/health", 1)[0]
            what = f"{name} at {where} ({setting}) is not reachable ({type(err).__name__})"
            raise ServerDown(what, fix, "prefect" if name == "Prefect API" else "mlflow") from err


def _disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is a full disk (ENOSPC; polars and torch
    report it in their own exception types, with the system's message)."""
    import errno

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _run_flow(flow_fn, config, refresh: bool):
    """Run a flow; its RunResult. A stage output that Prefect's cache records but that was
    deleted makes one more run without the cache records (what exists is reused); a flow that
    failed because the Prefect API or the MLflow server stopped answering is a UsageError
    naming it (finished stages are kept)."""
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from tasks.stage import MissingOutputError

    try:
        with temporary_settings(
            {PREFECT_TASKS_REFRESH_CACHE: refresh or PREFECT_TASKS_REFRESH_CACHE.value()}
        ):
            return flow_fn(config)
    except MissingOutputError as err:
        if refresh:
            raise
        print(
            f"warning: {err}\nrunning again without Prefect's cache records: stages whose "
            "outputs are in the artifacts root are reused, the deleted ones computed again",
            file=sys.stderr,
        )
        return _run_flow(flow_fn, config, refresh=True)
    except Exception as err:
        if _disk_full(err):
            raise UsageError(
                f"artifacts_root: the disk under {config.artifacts_root} is full ({err}); the "
                "stage that was writing left only its .partial folder and finished stages are "
                "kept: free some space (or --set artifacts_root=PATH) and run the same command"
            ) from err
        try:
            _check_servers(config)
        except ServerDown as gone:
            LOST.add(gone.server)
            raise UsageError(
                f"{gone.what}: it stopped answering during the run. "
                f"Finished stages are kept under {config.artifacts_root}; run the same command "
                "again once it is back, and it resumes from there"
            ) from err
        raise


def _command(args: argparse.Namespace, command: str) -> str:
    """The command as a user would type it again (docs flags included)."""
    out = ["gr2", command, *(["--config", args.config] if args.config else [])]
    out += [] if args.config else ["--profile", args.profile]
    out += [f"--set {s}" for s in args.set]
    for flag in ("doc", "midtrain_doc", "sft_doc", "rl_doc", "timings_doc"):
        if getattr(args, flag, None):
            out += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    return " ".join(out)


def _variant(command: str) -> str:
    """A run with --set overrides gets doc sections of its own (read from the run's command, so
    that `gr2 report` on such a run writes the sections the run would have)."""
    return "".join(f", {s}" for s in re.findall(r"--set (\S+)", command))


def _report(args: argparse.Namespace, config, result, command: str) -> None:
    """Print the run's tables and write the docs sections asked for."""
    from tasks import report

    written, variant = [], _variant(command)
    if result.flow == "ctc-summarization":
        text = report.ctc_report(result)
        if args.doc:
            written.append(report.write_ctc_doc(config, result, command, args.doc, variant))
    else:
        tables = report.pipeline_report(config, result)
        text = report.pipeline_console(tables)
        written = report.write_docs(
            config,
            result,
            tables,
            command,
            args.doc,
            args.midtrain_doc,
            args.sft_doc,
            args.rl_doc,
        )
    if args.timings_doc:
        written.append(report.write_timings(result, command, variant, args.timings_doc))
    print(report.console(result, text))
    for section in written:
        print(f"Wrote section {section}")


def cmd_run(args: argparse.Namespace) -> int:
    from data_contracts.config import load_profile
    from flows.gr2_pipeline import gr2_pipeline
    from tasks.report import record

    config = _load(load_profile, args)
    _check_data_files(config)
    _check_writable(config)
    _check_servers(config)
    result = _run_flow(gr2_pipeline, config, args.refresh)
    command = _command(args, "run")
    record(result, command=command)
    _report(args, config, result, command)
    return 0


def cmd_ctc(args: argparse.Namespace) -> int:
    from data_contracts.ctc import load_ctc_profile
    from flows.ctc_summarization import ctc_summarization
    from tasks.report import record

    config = _load(load_ctc_profile, args)
    _check_writable(config)
    _check_servers(config)
    result = _run_flow(ctc_summarization, config, args.refresh)
    command = _command(args, "ctc")
    record(result, command=command)
    print(f"Registered model version {result.model_version}")
    _report(args, config, result, command)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The tables and docs sections of a finished run, read back from MLflow and its manifests
    (no stage runs): `--run-id`, or the newest finished run of `--profile`."""
    from data_contracts.config import PipelineConfig, load_profile, upgrade_logged
    from data_contracts.ctc import CTCFlowConfig, load_ctc_profile
    from tasks.report import COMMAND_TAG, latest_run, read_run
    from tasks.tracking import resolve_uri

    loader = load_ctc_profile if args.ctc else load_profile
    config = _load(loader, args)
    uri = args.tracking_uri or resolve_uri(config)
    try:
        run_id = args.run_id or latest_run(uri, config.tracking.experiment, config.profile)
    except ValueError as err:  # no finished run of the profile
        raise UsageError(str(err)) from err
    result, logged = read_run(uri, run_id)
    if result.flow == "ctc-summarization":
        config = CTCFlowConfig(**logged)
    else:
        config = PipelineConfig(**upgrade_logged(logged))
    from mlflow.tracking import MlflowClient

    command = MlflowClient(uri).get_run(run_id).data.tags.get(COMMAND_TAG)
    # a run started before commands were recorded: its flow on its profile
    flow = "ctc" if result.flow == "ctc-summarization" else "run"
    _report(args, config, result, command or f"gr2 {flow} --profile {result.profile}")
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

    return _load(load_profile, args)


def registered_version(config, version: str = "", alias: str = ""):
    """The registered model's `version` (or the version under `alias`), checked before any
    flow starts; a name, version or alias that is not there is a UsageError saying what is."""
    from tasks.registry import alias_version, client_for
    from tasks.tracking import resolve_uri

    _check_servers(config, prefect=False)
    uri, name = resolve_uri(config), config.registry.model_name
    client = client_for(uri)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if not versions:
        raise UsageError(
            f"no registered model {name!r} at {uri}: run the pipeline first (`gr2 run`), or "
            "point registry.model_name / tracking at the registry that has it"
        )
    if version:
        if not version.isdigit() or int(version) not in versions:
            raise UsageError(f"{name} has no version {version!r}; its versions: {versions}")
        return client.get_model_version(name, version)
    mv = alias_version(client, name, alias)
    if mv is None:
        aliases = sorted(client.get_registered_model(name).aliases)
        raise UsageError(
            f"{name} has no version with alias {alias!r} (aliases: {aliases or 'none'}; "
            f"versions: {versions})"
        )
    return mv


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.registry import gr2_promote
    from tasks.registry import CHALLENGER

    config = _config(args)
    registered_version(config, args.version or "", CHALLENGER)
    _check_servers(config)  # the decision runs as a Prefect flow
    print(gr2_promote(config, args.version or ""))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from tasks.registry import CHAMPION, rollback
    from tasks.tracking import resolve_uri

    config = _config(args)
    registered_version(config, alias=CHAMPION)
    try:
        old, new = rollback(resolve_uri(config), config.registry.model_name)
    except RuntimeError as err:  # no previous champion recorded
        raise UsageError(str(err)) from err
    print(f"{config.registry.model_name}: {CHAMPION} moved from version {old} back to {new}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the alias with MLflow's scoring app under uvicorn in this process
    (`tasks.scoring_server`: body limit, one prediction at a time, bounded queue, SIGTERM)."""
    from tasks.scoring_server import port_free, serve
    from tasks.tracking import resolve_uri

    config = _config(args)
    registered_version(config, alias=args.alias)
    if not port_free(args.host, args.port):
        raise UsageError(
            f"{args.host}:{args.port} is already in use (another `gr2 serve`?); "
            "choose another with --port"
        )
    uri = f"models:/{config.registry.model_name}@{args.alias}"
    tracking = resolve_uri(config)
    if args.host not in LOOPBACK:
        print(
            f"warning: --host {args.host} makes the model reachable from other machines; the "
            "scoring server has no authentication (put it behind one, or keep 127.0.0.1)",
            file=sys.stderr,
        )
    print(f"serving {uri} from {tracking} on http://{args.host}:{args.port}", flush=True)
    print(
        f"  curl -s http://{args.host}:{args.port}/invocations -H 'Content-Type: application/json' "
        '-d \'{"dataframe_records": [{"history": ["<item id>", ...], "candidates": [...]}]}\'',
        flush=True,
    )
    serve(
        uri, tracking, args.host, args.port, args.max_body_bytes, args.max_waiting, args.graceful_s
    )
    return 0


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
    debug = "show the traceback of a user error (a bad config, file or option) too"
    parser.add_argument("--debug", action="store_true", help=debug)
    common = argparse.ArgumentParser(add_help=False)  # the same flag after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kw) -> argparse.ArgumentParser:  # --debug after the command too
        return sub.add_parser(name, parents=[common], **kw)

    def flow_options(cmd: argparse.ArgumentParser, profiles: str) -> None:
        cmd.add_argument(
            "--profile", default="demo", help=f"a profile in {profiles} (default demo)"
        )
        cmd.add_argument("--config", help="a YAML config file (overrides --profile)")
        cmd.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. preranker.epochs=3 (repeatable)",
        )

    def doc_options(cmd: argparse.ArgumentParser, pipeline: bool) -> None:
        cmd.add_argument("--doc", help="write the results tables as sections of this markdown file")
        cmd.add_argument(
            "--timings-doc",
            help="write the run's wall times (flow and stages) as a section of this file "
            "(the repository keeps them in docs/timings.md)",
        )
        if not pipeline:
            return
        cmd.add_argument("--midtrain-doc", help="the student's next-item table, as a section")
        cmd.add_argument("--sft-doc", help="teacher acceptance and SFT rerankers, as a section")
        cmd.add_argument(
            "--rl-doc", help="DAPO curves (a PNG under img/ beside it) and the RL tables"
        )

    run = command("run", help="run the GR2 pipeline flow")
    flow_options(run, "infra/configs/")
    run.add_argument("--refresh", action="store_true", help="ignore cached stage results")
    doc_options(run, pipeline=True)
    run.set_defaults(func=cmd_run)
    ctc = command("ctc", help="run the CTC summarization flow")
    flow_options(ctc, "infra/configs/ctc/")
    ctc.add_argument("--refresh", action="store_true", help="ignore cached stage results")
    doc_options(ctc, pipeline=False)
    ctc.set_defaults(func=cmd_ctc)
    rep = command(
        "report", help="print and write the docs sections of a finished run (no stage runs)"
    )
    flow_options(rep, "infra/configs/ (its tracking settings)")
    rep.add_argument("--ctc", action="store_true", help="the profile is a CTC profile")
    rep.add_argument("--run-id", help="the run's parent MLflow run (default: the newest)")
    rep.add_argument("--tracking-uri", help="default: the profile's tracking URI")
    doc_options(rep, pipeline=True)
    rep.set_defaults(func=cmd_report)
    for name, func, text in (
        ("promote", cmd_promote, "decide on the challenger (or --version) against the champion"),
        ("rollback", cmd_rollback, "move the champion alias back to previous-champion"),
        ("serve", cmd_serve, "serve a registered reranker alias over HTTP (127.0.0.1)"),
    ):
        cmd = command(name, help=text)
        cmd.add_argument("--profile", default="demo", help="the profile whose registry to use")
        cmd.add_argument("--config", help="a YAML config file (overrides --profile)")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        cmd.set_defaults(func=func)
        if name == "promote":
            cmd.add_argument("--version", help="registered version (default: the challenger)")
        if name == "serve":
            cmd.add_argument("--alias", default="champion")
            cmd.add_argument(
                "--host", default="127.0.0.1", help="another address warns: no authentication"
            )
            cmd.add_argument("--port", type=int, default=5001)
            cmd.add_argument(
                "--max-body-bytes",
                type=int,
                default=MAX_BODY_BYTES,
                help="larger request bodies are answered 413",
            )
            cmd.add_argument(
                "--max-waiting",
                type=int,
                default=MAX_WAITING,
                help="requests queued past this are answered 503 with Retry-After",
            )
            cmd.add_argument(
                "--graceful-s",
                type=int,
                default=GRACEFUL_S,
                help="on SIGTERM, seconds in-flight requests get to finish",
            )
    val = command("validate", help="check your own data files against the contracts")
    val.add_argument("--interactions", required=True)
    val.add_argument("--items", required=True)
    val.add_argument("--users")
    val.add_argument("--min-user-interactions", type=int, default=5)
    val.add_argument("--min-item-interactions", type=int, default=5)
    val.set_defaults(func=cmd_validate)
    prof = command("profiles", help="list the config profiles")
    prof.set_defaults(func=cmd_profiles)
    args = parser.parse_args(argv)
    if os.environ.get("PREFECT_HOME"):  # Prefect does not create missing parents itself
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        return args.func(args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"gr2 {args.command}: {err}", file=sys.stderr)
        print("(gr2 --debug ... shows the traceback)", file=sys.stderr)
        return 2


def console() -> None:
    """The `gr2` console script: `main`, then exit with its code. After a run that lost the
    Prefect API, Prefect's event worker would try to deliver each event it queued, one
    connection timeout after another (about 40 s on the ci profile), before the process could
    end; none can be delivered, so the process ends at once (standard streams flushed; MLflow
    logs synchronously)."""
    code = main()
    if "prefect" in LOST:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
