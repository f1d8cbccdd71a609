"""The adapter's model card (its README.md): what it was trained from, how, how well, and how to load it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

CARD_FACTS = "card.json"  # the facts below as JSON, beside the adapter's README.md


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states, gathered by the train stage (and the evaluation, where it exists)."""

    name: str
    base_model: dict[str, Any]
    train_file: str
    train_sha256: str
    examples: int
    lora: dict[str, Any]
    train: dict[str, Any]
    summary: dict[str, Any]
    evaluation: dict[str, Any] | None = None


def describe_source(source: dict[str, Any]) -> str:
    """A fetched source as one line: hub id and revision, registry file and member, or local path."""
    if source.get("kind") == "hub":
        return f"{source['id']}@{source['revision']}"
    if source.get("kind") == "registry":
        return f"{source['package']}=={source['version']} `{source['member']}` (sha256 {source['sha256'][:12]})"
    return f"`{source.get('path', '?')}`"


def _evaluation_lines(facts: CardFacts) -> list[str]:
    if facts.evaluation is None:
        return [
            "Evaluated by the pipeline's `eval_all` stage after training: accuracy, F1, precision and recall on the",
            f"held-out tweets and text scores on held-out instructions are in `metrics/{facts.name}.json` and",
            "`report/report.md` of the same Git commit (`dvc metrics show`).",
        ]
    score = facts.evaluation["sentiment"]["score"]
    text = facts.evaluation.get("instructions", {})
    n = facts.evaluation.get("examples", {})
    return [
        f"On {n.get('sentiment', '?')} held-out tweets (label scoring): accuracy {score['accuracy']:.3f}, "
        f"F1 {score['f1']:.3f}, precision {score['precision']:.3f}, recall {score['recall']:.3f}.",
        "",
        f"On {n.get('instructions', '?')} held-out instructions: "
        + ", ".join(f"{key} {value:.3f}" for key, value in text.items())
        + ".",
    ]


def render_model_card(facts: CardFacts) -> str:
    """The card as Markdown with a YAML header that the Hugging Face Hub reads."""
    base = facts.base_model
    header = {
        "library_name": "peft",
        "base_model": base.get("source", {}).get("id", base.get("name")),
        "tags": ["lora", "sft", "trl", "lorapipe", facts.name],
    }
    summary = facts.summary
    return "\n".join(
        [
            "---",
            yaml.safe_dump(header, sort_keys=False).strip(),
            "---",
            "",
            f"# {facts.name} LoRA adapter for {base.get('name', '?')}",
            "",
            f"A LoRA adapter trained by the lorapipe pipeline (`train_{facts.name}` stage) with TRL's SFTTrainer, loss",
            "on the assistant's answer only.",
            "",
            "## Base model",
            "",
            f"{base.get('name', '?')}: {describe_source(base.get('source', {}))}.",
            "",
            "## Data",
            "",
            f"`{facts.train_file}`: {facts.examples} prompt/completion records (sha256 {facts.train_sha256[:12]}...).",
            "",
            "## Training",
            "",
            "```yaml",
            yaml.safe_dump({"lora": facts.lora, "train": facts.train}, sort_keys=False).strip(),
            "```",
            "",
            f"{summary.get('steps')} optimizer steps, {summary.get('tokens_seen')} tokens in "
            f"{summary.get('wall_seconds')} s on {summary.get('device')} ({summary.get('precision')}"
            f"{', 4-bit nf4' if summary.get('quantized_4bit') else ''}, {summary.get('processes', 1)} process(es)); "
            f"final training loss {summary.get('final_loss')}.",
            *_precision_lines(summary),
            "",
            "## Evaluation",
            "",
            *_evaluation_lines(facts),
            "",
            "## Use",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'base = AutoModelForCausalLM.from_pretrained("models/base")  # the base model above',
            f'model = PeftModel.from_pretrained(base, "models/adapters/{facts.name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("models/adapters/{facts.name}")',
            "```",
            "",
            "Or from the pipeline's repository: `python -m lorapipe.cli.chat --adapter "
            f'models/adapters/{facts.name} "..."`; elsewhere: `dvc artifacts get <repo-url> {facts.name}-adapter`.',
            "",
        ]
    )


def _precision_lines(summary: dict) -> list[str]:
    """The precision choice and, when it was timed, both rates (examples/s of a forward and backward)."""
    rates = summary.get("precision_rates")
    if not rates:
        return []
    measured = ", ".join(f"{name} {rate:.2f}" for name, rate in rates.items())
    chosen = f"Precision {summary.get('precision')}, chosen by timing this CPU before training"
    return ["", f"{chosen} ({measured} examples/s of a {summary.get('precision_probe') or 'forward + backward'})."]
