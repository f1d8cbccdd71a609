"""Scores of answers against reference answers: token F1, ROUGE-L, BERTScore.

Classification metrics of labels are :mod:`lorapipe.classification`.

Everything here runs offline: ROUGE-L comes from ``rouge_score`` directly (the ``evaluate``
library's loader needs the hub) and BERTScore uses a local encoder folder.
"""

from __future__ import annotations

import importlib.util
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from lorapipe.errors import PipelineError

# Texts the BERTScore encoder runs at once: bert_score's 64 pads every text of a batch to its longest and holds a
# 64-row attention matrix of that length; 16 took half the time with the same scores (docs/evaluation-cost.md).
BERTSCORE_BATCH = 16

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> list[str]:
    """SQuAD normalisation: lower case, no punctuation, no articles, whitespace tokens."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 between two texts after SQuAD normalisation (1.0 when both are empty)."""
    predicted, expected = normalize_answer(prediction), normalize_answer(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure per pair, with the Porter stemmer as in the original ROUGE setup."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def resolve_encoder(name: str) -> str:
    """A BERTScore encoder as a local folder: a path, or an installed package that ships one under ``model/``.

    Any other name is passed on as a hub model id (full-scale profiles only).
    """
    if Path(name).is_dir():
        return str(Path(name).resolve())
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if not (folder / "config.json").is_file():
            raise PipelineError(f"package {name!r} (eval.bertscore_model) has no model folder at {folder}")
        return str(folder)
    return name


def bertscore_f1(predictions: Sequence[str], references: Sequence[str], encoder: str, num_layers: int) -> list[float]:
    """BERTScore F1 per pair from the first ``num_layers`` layers of ``encoder``, not rescaled.

    A pair with a blank side scores 0.0 (bert_score itself fails on a blank text with transformers 5).
    """
    from bert_score import score

    scored = [i for i, (p, r) in enumerate(zip(predictions, references, strict=True)) if p.strip() and r.strip()]
    values = [0.0] * len(predictions)
    if scored:
        _, _, f1 = score(
            [predictions[i] for i in scored],
            [references[i] for i in scored],
            model_type=resolve_encoder(encoder),
            num_layers=num_layers,
            lang="en",
            batch_size=BERTSCORE_BATCH,
        )
        for i, value in zip(scored, f1.tolist(), strict=True):
            values[i] = value
    return values


def text_scores(
    predictions: Sequence[str], references: Sequence[str], encoder: str, num_layers: int
) -> dict[str, list[float]]:
    """Per-pair token F1, ROUGE-L and BERTScore F1."""
    return {
        "token_f1": [token_f1(p, r) for p, r in zip(predictions, references, strict=True)],
        "rouge_l": rouge_l(predictions, references),
        "bertscore_f1": bertscore_f1(predictions, references, encoder, num_layers),
    }


def mean_scores(per_pair: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(sum(values) / len(values), 4) for name, values in per_pair.items()}
