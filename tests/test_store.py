"""The artifact store: content-addressed keys, manifest last, atomic publish."""

import json

import polars as pl

from data_contracts.config import PrerankerConfig
from data_contracts.manifest import Manifest
from tasks.store import StageDir, stage_key


def test_key_depends_on_config_upstream_and_code():
    up = Manifest(
        stage="a", key="k1", config_hash="", code_version="", schema_version="1", directory="/x"
    )
    base = stage_key("s", PrerankerConfig(), [up], "c1")
    assert base == stage_key("s", PrerankerConfig(), [up], "c1")
    assert base != stage_key("s", PrerankerConfig(epochs=3), [up], "c1")
    assert base != stage_key("s", PrerankerConfig(), [up.model_copy(update={"key": "k2"})], "c1")
    assert base != stage_key("s", PrerankerConfig(), [up], "c2")


def test_partial_folder_is_never_complete_and_commit_publishes(tmp_path):
    folder = StageDir(tmp_path, "stage", "abc")
    work = folder.open()
    pl.DataFrame({"x": [1, 2, 3]}).write_parquet(work / "t.parquet")
    (work / "ckpt.pt").write_text("scratch")
    assert folder.existing() is None  # crash here: nothing looks complete
    again = folder.open()  # a rerun finds the same work folder (resume)
    assert (again / "ckpt.pt").exists()

    manifest = folder.commit(
        {"t": "t.parquet"}, PrerankerConfig(), [], "code", {"m": 1.0}, scratch=["ckpt.pt"]
    )
    assert not folder.partial.exists() and folder.final.exists()
    assert not (folder.final / "ckpt.pt").exists()
    assert manifest.files["t"].rows == 3 and len(manifest.files["t"].sha256) == 64
    on_disk = json.loads((folder.final / "manifest.json").read_text())
    assert on_disk["key"] == "abc" and on_disk["metrics"] == {"m": 1.0}
    assert folder.existing() == manifest
    assert manifest.path("t").exists()
