"""User mistakes at the command line: one message naming the field, file, line or option, exit
code 2 and no traceback; `--debug` shows the traceback. Each case stops before any stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.cli import UsageError, main


def _bad(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


CASES = {
    "unknown profile": (["run", "--profile", "nope"], ["profile 'nope' not found", "known:"]),
    "missing config file": (
        ["run", "--config", "no/such.yaml"],
        ["profile 'no/such.yaml' not found"],
    ),
    "negative epochs": (
        ["run", "--profile", "ci", "--set", "preranker.epochs=-1"],
        ["invalid config", "preranker.epochs", "greater than or equal to 1", "got -1"],
    ),
    "misspelt field": (
        ["run", "--profile", "ci", "--set", "preranker.epoch=3"],
        ["preranker.epoch: Extra inputs are not permitted"],
    ),
    "unknown trace mode": (
        ["run", "--profile", "ci", "--set", "teacher.modes=[targetted]"],
        ["teacher.modes.0", "'targeted', 'rejection' or 'grounded'", "got 'targetted'"],
    ),
    "wrong type": (
        ["run", "--profile", "ci", "--set", "sft.lr=fast"],
        ["sft.lr", "valid number", "got 'fast'"],
    ),
    "--set without a value": (
        ["run", "--profile", "ci", "--set", "preranker.epochs"],
        ["--set expects KEY=VALUE", "'preranker.epochs'"],
    ),
    "--set value not YAML": (
        ["run", "--profile", "ci", "--set", "teacher.modes=[rejection"],
        ["--set teacher.modes=[rejection: the value is not YAML"],
    ),
    "--set into a value": (
        ["run", "--profile", "ci", "--set", "profile.name=x"],
        ["--set profile.name: profile is a value, not a section"],
    ),
    "promote with an unknown profile": (
        ["promote", "--profile", "nope"],
        ["gr2 promote: profile 'nope' not found"],
    ),
    "ctc with a bad field": (
        ["ctc", "--profile", "ci", "--set", "ctc.nope=1"],
        ["invalid config", "ctc.nope: Extra inputs are not permitted"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_mistake_is_one_message_and_exit_code_2(case, capsys):
    argv, expected = CASES[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, f"{case}: {text!r} not in {err!r}"
    assert "Traceback" not in err and "--debug" in err


def test_broken_files_are_named_with_their_line(tmp_path, capsys):
    broken = _bad(tmp_path, "broken.yaml", "preranker:\n  epochs: [1, 2\nsft: {}\n")
    assert main(["run", "--config", broken]) == 2
    err = capsys.readouterr().err
    assert f"broken YAML in {broken}, line 3" in err
    listed = _bad(tmp_path, "list.yaml", "- preranker\n- sft\n")
    assert main(["run", "--config", listed]) == 2
    assert "expected a mapping of settings, got list" in capsys.readouterr().err
    cycle = _bad(tmp_path, "self.yaml", "base: self.yaml\n")
    assert main(["run", "--config", cycle]) == 2
    assert "makes a cycle" in capsys.readouterr().err


def test_a_missing_data_file_is_named_before_any_stage_runs(tmp_path, capsys):
    items = _bad(tmp_path, "items.csv", "item_id,title\n")
    sets = ["data.dataset=custom", f"data.items_path={items}"]
    sets.append(f"data.interactions_path={tmp_path / 'gone.csv'}")
    argv = ["run", "--profile", "ci", *(a for s in sets for a in ("--set", s))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"data.interactions_path: no such file '{tmp_path / 'gone.csv'}'" in err
    assert "gr2 validate" in err


def test_an_artifacts_root_that_cannot_be_written_is_named(tmp_path, capsys):
    blocker = _bad(tmp_path, "a-file", "not a folder\n")
    for command in ("run", "ctc"):
        argv = [command, "--profile", "ci", "--set", f"artifacts_root={blocker}/artifacts"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"artifacts_root: cannot write to '{blocker}/artifacts'" in err
        assert "--set artifacts_root=PATH" in err and "Traceback" not in err


def test_servers_that_are_down_are_named_before_any_stage(tmp_path, monkeypatch, capsys):
    """A Prefect API or an MLflow tracking server that nobody answers at (a free port): one
    message naming the server, its URL and setting, and the fix; nothing written."""
    # Prefect's settings are read before the variable is set: imported for the first time
    # under it, they would keep it after monkeypatch removes it
    import prefect.settings  # noqa: F401

    from gr2_core.serving import free_port

    root = tmp_path / "artifacts"
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("PREFECT_API_URL", f"{down}/api")
    assert main(["run", "--profile", "ci", "--set", f"artifacts_root={root}"]) == 2
    err = capsys.readouterr().err
    assert f"Prefect API at {down}/api (PREFECT_API_URL) is not reachable" in err
    assert "make ui" in err and "Traceback" not in err
    monkeypatch.delenv("PREFECT_API_URL")
    for command in ("run", "ctc", "serve", "promote", "rollback"):
        argv = [command, "--profile", "ci", "--set", f"artifacts_root={root}"]
        argv += ["--set", f"tracking.tracking_uri={down}"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"MLflow tracking server at {down} (tracking.tracking_uri) is not reachable" in err
    # the setting named is the one the URI came from: the config's wins over the variable
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert main(argv) == 2
    assert f"at {down} (tracking.tracking_uri)" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    assert main(["run", "--profile", "ci", "--set", f"artifacts_root={root}"]) == 2
    assert f"at {down} (MLFLOW_TRACKING_URI) is not reachable" in capsys.readouterr().err
    assert [p.name for p in root.iterdir()] == []  # no stage started


def test_debug_shows_the_traceback_before_or_after_the_command():
    with pytest.raises(UsageError) as err:
        main(["--debug", "run", "--profile", "ci", "--set", "preranker.epochs=-1"])
    assert isinstance(err.value.__cause__, ValidationError)
    with pytest.raises(UsageError) as err:
        main(["run", "--profile", "nope", "--debug"])
    assert isinstance(err.value.__cause__, FileNotFoundError)


def _at(uri: str) -> list[str]:
    return ["--set", f"tracking.tracking_uri={uri}"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow registry (SQLite) holding one version of the ci profile's model, with the
    champion alias and no previous champion."""
    from mlflow.tracking import MlflowClient

    from data_contracts.config import load_profile

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    name = load_profile("ci").registry.model_name
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(name)
    client.create_model_version(name, source=tmp_path_factory.mktemp("model").as_uri())
    client.set_registered_model_alias(name, "champion", "1")
    empty = f"sqlite:///{tmp_path_factory.mktemp('empty') / 'mlflow.db'}"
    return uri, empty


@pytest.mark.parametrize(
    ("argv", "which", "expected"),
    [
        (["promote"], "empty", "no registered model 'gr2-reranker'"),
        (["promote", "--version", "7"], "full", "has no version '7'; its versions: [1]"),
        (["promote"], "full", "no version with alias 'challenger' (aliases: ['champion']"),
        (["serve", "--alias", "nope"], "full", "no version with alias 'nope'"),
        (["rollback"], "full", "nothing to roll back to (champion: 1, previous-champion: none)"),
        (["report"], "empty", "no finished run of profile 'ci'"),
    ],
)
def test_registry_mistakes_are_named_before_any_flow(registry, argv, which, expected, capsys):
    uri = registry[0] if which == "full" else registry[1]
    assert main([*argv, "--profile", "ci", *_at(uri)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("host,warned", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_serving_beyond_this_machine_is_warned_about(registry, host, warned, monkeypatch, capsys):
    """`gr2 serve` binds 127.0.0.1 by default; another address works but says that the
    scoring server has no authentication. (Serving itself is stopped here: the deployment test
    serves for real.)"""
    launched = []

    def serve(uri, tracking, bind, port, *limits):
        launched.append((uri, bind, port))
        raise SystemExit(0)

    monkeypatch.setattr("tasks.scoring_server.serve", serve)
    with pytest.raises(SystemExit):
        main(["serve", "--profile", "ci", "--host", host, "--port", "5999", *_at(registry[0])])
    assert launched == [("models:/gr2-reranker@champion", host, 5999)]
    err = capsys.readouterr().err
    assert ("no authentication" in err) is warned
