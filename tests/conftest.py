"""Shared fixtures: a tiny random Llama with a tiny BPE tokenizer, tiny data, tiny params, record helpers."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lorapipe.data.prompts import instruction_prompt, sentiment_prompt
from lorapipe.records import record

ROOT = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

POSITIVE = ["love this", "great ride", "so happy", "amazing car", "wonderful day", "best thing ever"]
NEGATIVE = ["hate this", "awful ride", "so sad", "terrible car", "horrible day", "worst thing ever"]
CORPUS = (
    POSITIVE
    + NEGATIVE
    + [
        "You are a helpful assistant.",
        "Classify the sentiment of this tweet as positive or negative.",
        "Tweet:",
        "positive",
        "negative",
        "neutral",
        "Write a short poem about the sea.",
        "The sea is wide and blue.",
        "Name three colours.",
        "Red, green and blue.",
        "Summarise the text in one line.",
    ]
)


def copy_tracked_files(work: Path) -> Path:
    """``work`` as a copy of the repository's Git-tracked files, without dvc.lock (its results are not the copy's)."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if name != "dvc.lock" and (ROOT / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
    return work


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_model(out: Path, seed: int = 0, sliding_window: int | None = None) -> Path:
    """A randomly initialised two-layer Llama saved as safetensors with its tokenizer; with ``sliding_window``,
    a Mistral of the same shapes (its cache layers count the tokens they hold)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config_class, model_class = (
        (LlamaConfig, LlamaForCausalLM) if sliding_window is None else (MistralConfig, MistralForCausalLM)
    )
    extra = {} if sliding_window is None else {"sliding_window": sliding_window}
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
        **extra,
    )  # wide enough that a frozen tied head can express a preference
    model_class(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_tweets_csv(path: Path, n_per_label: int = 40, seed: int = 0, encoding: str = "latin-1") -> Path:
    rng = random.Random(seed)
    rows = ["sentiment,confidence,text"]
    for label, words in (("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", ["just a car", "a day"])):
        for i in range(n_per_label):
            confidence = "" if i % 10 == 9 else f"{rng.uniform(0.5, 1.0):.4f}"
            rows.append(f'{label},{confidence},"{rng.choice(words)} #{i} {label[:3]}"')
    path.write_text("\n".join(rows) + "\n", encoding=encoding)
    return path


def write_instructions_json(path: Path, n: int = 30) -> Path:
    pairs = [
        {"instruction": f"Name {i} colours.", "output": "Red, green and blue.", "generator": "x"} for i in range(n)
    ]
    path.write_text(json.dumps(pairs), encoding="utf-8")
    return path


def tiny_params(model_dir: Path, tweets: Path, instructions: Path) -> dict:
    """The embedded profile with local tiny sources and sizes small enough for seconds of work."""
    params = yaml.safe_load((ROOT / "profiles" / "embedded.yaml").read_text())
    params["model"].update(name="tiny-llama", source={"kind": "local", "path": str(model_dir)})
    params["data"]["tweets"]["source"] = {"kind": "local", "path": str(tweets)}
    params["data"]["instructions"]["source"] = {"kind": "local", "path": str(instructions)}
    params["data"]["split"].update(
        min_confidence=0.6, train_size=24, valid_size=6, test_size=12, instruction_test_size=6
    )
    params["mix"].update(size=20, instruction_share=0.25)
    params["train"].update(
        batch_size=4,
        gradient_accumulation_steps=1,
        max_length=256,
        save_steps=4,
        logging_steps=1,
        eval_steps=3,
        learning_rate=5e-3,
        cpu_precision="fp32",  # pinned: two runs compared must not time their way to different precisions
    )
    params["eval"].update(batch_size=8, generation_batch_size=4, max_new_tokens=8)
    return params


TWEETS = [(text, "positive") for text in POSITIVE] + [(text, "negative") for text in NEGATIVE]


LABELS = ("positive", "negative")


def tweet_records(prompt, tweets: list[tuple[str, str]] = TWEETS, labels=LABELS) -> list[dict]:
    """One tweet record, with its label and text, for each (text, label)."""
    return [record(sentiment_prompt(text, prompt, labels), label, label=label, text=text) for text, label in tweets]


def sentiment_rows(prompt, n: int = 32) -> list[dict]:
    """``n`` tweet records cycling through the tiny corpus's positive, then negative, phrases."""
    return tweet_records(prompt, [TWEETS[i % len(TWEETS)] for i in range(n)])


INSTRUCTIONS = [
    ("Write a short poem about the sea.", "", "The sea is wide and blue."),
    ("Name three colours.", "", "Red, green and blue."),
    ("Summarise the text in one line.", "The sea is wide and blue.", "The sea is wide."),
]


def instruction_rows(prompt, n: int = 3) -> list[dict]:
    """``n`` instruction records cycling through :data:`INSTRUCTIONS`, with instruction and input."""
    picked = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(n)]
    return [record(instruction_prompt(i, x, prompt), out, instruction=i, input=x) for i, x, out in picked]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def tiny_sources(tmp_path) -> dict[str, Path]:
    return {
        "tweets": write_tweets_csv(tmp_path / "tweets.csv"),
        "instructions": write_instructions_json(tmp_path / "instructions.json"),
    }


@pytest.fixture()
def local_index(tmp_path, monkeypatch):
    """A package index on loopback that registry sources are fetched from (PIP_INDEX_URL), instead of PyPI."""
    from package_index import serve_index

    with serve_index(tmp_path / "index") as index:
        monkeypatch.setenv("PIP_INDEX_URL", index.url)
        yield index


COMMIT = "c0ffee" + "0" * 34


@pytest.fixture()
def hub_stand_in(monkeypatch):
    """The hub's commit lookup and downloads, answered from local folders (no test reaches the hub)."""
    from types import SimpleNamespace

    calls: list[tuple] = []
    repos: dict[str, Path] = {}

    def repo_info(self, repo_id, repo_type, revision, token):
        calls.append(("resolve", repo_id, repo_type, revision))
        return SimpleNamespace(sha=COMMIT)

    def snapshot_download(repo_id, revision, token, allow_patterns=None, repo_type="model", local_dir=None):
        calls.append(("download", repo_id, repo_type, revision))
        out = Path(local_dir) if local_dir else repos[repo_id].with_name(repos[repo_id].name + "-snapshot")
        shutil.copytree(repos[repo_id], out, dirs_exist_ok=True)
        return str(out)

    monkeypatch.setattr("huggingface_hub.HfApi.repo_info", repo_info)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return SimpleNamespace(calls=calls, repos=repos)


@contextlib.contextmanager
def local_ray_cluster(head_cpus: int, worker_cpus: list[int]) -> Iterator[str]:
    """A real Ray cluster of a head and one worker node per entry, all on this machine and on the loopback
    address only; its address."""
    from ray.cluster_utils import Cluster

    # 127.0.0.2: Ray rewrites 127.0.0.1 and localhost to the machine's network address; any other loopback address
    # keeps every connection on the loopback interface.
    node = {"node_ip_address": "127.0.0.2", "include_dashboard": False, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": head_cpus})
    try:
        for cpus in worker_cpus:
            cluster.add_node(**{**node, "num_cpus": cpus})
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()
