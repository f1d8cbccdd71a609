"""Shared-prefix decoding: label log-likelihoods and greedy answers from one prefill per batch.

All prompts of a test file start with the same tokens (the system turn and the instruction up to
the tweet). Their KV cache is computed once and copied into every batch, so each batch runs only
the part after it. Batches are sorted by length; the rows are padded on the left *after* the
shared prefix (``[prefix | pad | suffix]``) with explicit position ids, so every row ends at the
last column: the next-token logits that score the labels are also the first greedy step, and the
greedy loop continues from the same cache.

Modules: :mod:`~lorapipe.decoding.prompts` (rendering, cutting, stop and label tokens),
:mod:`~lorapipe.decoding.prefill`, :mod:`~lorapipe.decoding.scoring` (label scoring, both ways),
:mod:`~lorapipe.decoding.greedy` (answers) and :mod:`~lorapipe.decoding.cache_edits` (every edit of transformers'
cache objects: the one file to audit on a transformers upgrade).
"""

from lorapipe.decoding.greedy import Generated, generate_answers
from lorapipe.decoding.prefill import prefill_passes
from lorapipe.decoding.prompts import answer_ids, common_prefix_length, encode, fit_prompts, render, stop_ids
from lorapipe.decoding.scoring import SentimentPrediction, predict_sentiment, score_labels

__all__ = [
    "Generated",
    "SentimentPrediction",
    "answer_ids",
    "common_prefix_length",
    "encode",
    "fit_prompts",
    "generate_answers",
    "predict_sentiment",
    "prefill_passes",
    "render",
    "score_labels",
    "stop_ids",
]
