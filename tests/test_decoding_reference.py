"""Decoding checked against references that share none of its code: stock eager attention, loaded anew, on a
sliding-window model whose prompts run past the window; the prefill cache handed over to decoding; the checks of
the transformers cache internals that decoding relies on."""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch
from test_evaluation import PROMPT
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from conftest import INSTRUCTIONS, LABELS, TWEETS, build_tiny_model, tweet_records
from lorapipe.data.prompts import instruction_prompt
from lorapipe.decoding import (
    answer_ids,
    cache_edits,
    encode,
    generate_answers,
    predict_sentiment,
    render,
    score_labels,
    stop_ids,
)
from lorapipe.decoding import greedy as decoding_greedy
from lorapipe.decoding import prefill as decoding_prefill
from lorapipe.decoding import scoring as decoding_scoring
from lorapipe.errors import PipelineError
from lorapipe.models.loading import load_causal_lm, load_for_inference, load_tokenizer

WINDOW = 8


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("sliding") / "model", sliding_window=WINDOW)


def eager(path: Path):
    return load_causal_lm(path, attention="eager").eval()


def by_hand_logprob(reference, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt) from one unpadded, uncached forward of prompt + answer: summed by hand."""
    with torch.inference_mode():
        logits = reference(input_ids=torch.tensor([prompt + answer])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + k, token].item() for k, token in enumerate(answer))


def eager_answers(reference, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    """Stock eager ``generate``, one unpadded prompt at a time (padding would count towards a sliding window)."""
    stops = stop_ids(reference, tokenizer)
    texts = []
    for ids in encode(tokenizer, render(tokenizer, prompts)):
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
            )[0, len(ids) :].tolist()
        end = next((i for i, token in enumerate(out) if token in stops), len(out))
        texts.append(tokenizer.decode(out[:end], skip_special_tokens=True).strip())
    return texts


def test_a_sliding_window_model_s_scores_and_answers_past_its_window_match_stock_eager(sliding_model, caplog):
    model, tokenizer = load_for_inference(sliding_model), load_tokenizer(sliding_model)
    reference = eager(sliding_model)
    assert cache_edits.sliding_window(model.config) == WINDOW
    tweets = [conversation["prompt"] for conversation in tweet_records(PROMPT, TWEETS[:3] + TWEETS[-3:])]
    assert all(len(ids) > 3 * WINDOW for ids in encode(tokenizer, render(tokenizer, tweets)))
    stops = stop_ids(model, tokenizer)
    with caplog.at_level(logging.INFO, logger="lorapipe.decoding"):
        predictions = predict_sentiment(model, tokenizer, tweets, LABELS, batch_size=3, max_new_tokens=4)
        scored = score_labels(model, tokenizer, tweets, LABELS, batch_size=3)
    assert sum("sliding window" in r.getMessage() for r in caplog.records) == 2  # one line per call
    for conversation, prediction, scores in zip(tweets, predictions, scored, strict=True):
        prompt = encode(tokenizer, render(tokenizer, [conversation]))[0]
        for label in LABELS:
            expected = by_hand_logprob(reference, prompt, answer_ids(tokenizer, conversation, label, stops))
            assert prediction.logprobs[label] == pytest.approx(expected, abs=1e-4)
            assert scores[label] == pytest.approx(expected, abs=1e-4)
    assert [p.answer for p in predictions] == eager_answers(reference, tokenizer, tweets, 4)

    long_input = " ".join(["The sea is wide and blue."] * 6)
    prompts = [instruction_prompt(i, x, PROMPT) for i, x, _ in [*INSTRUCTIONS, ("Summarise the text.", long_input, "")]]
    answers = generate_answers(model, tokenizer, prompts, batch_size=len(prompts), max_new_tokens=6).texts
    assert answers == eager_answers(reference, tokenizer, prompts, 6)


def test_a_sliding_window_model_within_its_window_keeps_the_batched_path(tmp_path):
    path = build_tiny_model(tmp_path, sliding_window=4096)
    model, tokenizer = load_for_inference(path), load_tokenizer(path)
    prompts = [instruction_prompt(i, x, PROMPT) for i, x, _ in INSTRUCTIONS]
    answers = generate_answers(model, tokenizer, prompts, batch_size=len(prompts), max_new_tokens=4).texts
    assert answers == eager_answers(eager(path), tokenizer, prompts, 4)


@pytest.mark.parametrize("way", ["generate", "sentiment"])
def test_decoding_frees_the_prefill_cache_once_it_has_moved_it(tiny_model, monkeypatch, way):
    """The prefill's key and value tensors are dead at the first decoding step: only the room holds the cache."""
    model, tokenizer = load_for_inference(tiny_model), load_tokenizer(tiny_model)
    prompts = [record["prompt"] for record in tweet_records(PROMPT)]

    def run() -> list[str]:
        if way == "generate":
            return generate_answers(model, tokenizer, prompts, batch_size=4, max_new_tokens=3).texts
        return [p.answer for p in predict_sentiment(model, tokenizer, prompts, LABELS, batch_size=4, max_new_tokens=3)]

    expected = run()
    prefilled: list[weakref.ref] = []
    alive_at_steps: list[int] = []
    decoding_now = []
    prefill, greedy, forward = decoding_prefill.prefill_batch, decoding_greedy.decode_greedy, model.forward

    def recording_prefill(*args, **kwargs):
        logits, fed_logits, state = prefill(*args, **kwargs)
        prefilled.extend(weakref.ref(t) for layer in state.cache.layers for t in (layer.keys, layer.values))
        return logits, fed_logits, state

    def marking_greedy(model, logits, state, *args, **kwargs):
        # The state decoding is handed (several prefills merged, or rows selected) is let go of too.
        prefilled.extend(weakref.ref(t) for layer in state.cache.layers for t in (layer.keys, layer.values))
        decoding_now.append(True)
        try:
            return greedy(model, logits, state, *args, **kwargs)
        finally:
            decoding_now.clear()

    def checking_forward(*args, **kwargs):
        if decoding_now:
            gc.collect()
            alive_at_steps.append(sum(ref() is not None for ref in prefilled))
        return forward(*args, **kwargs)

    monkeypatch.setattr(decoding_prefill, "prefill_batch", recording_prefill)
    monkeypatch.setattr(decoding_greedy, "decode_greedy", marking_greedy)  # generate_answers
    monkeypatch.setattr(decoding_scoring, "decode_greedy", marking_greedy)  # predict_sentiment
    monkeypatch.setattr(model, "forward", checking_forward)
    assert run() == expected
    assert prefilled and alive_at_steps  # prefilled batches were decoded on
    assert alive_at_steps[0] == 0 and set(alive_at_steps) == {0}


def test_the_cache_internals_decoding_relies_on_pass_their_checks():
    cache_edits.check.cache_clear()
    assert cache_edits.check() == cache_edits.Support(room=True)


@pytest.fixture()
def fresh_check():
    cache_edits.check.cache_clear()
    yield
    cache_edits.check.cache_clear()


@pytest.mark.parametrize("name", ["batch_select_indices", "batch_repeat_interleave"])
def test_a_cache_without_a_method_decoding_uses_stops_with_one_line(fresh_check, monkeypatch, name):
    monkeypatch.delattr(DynamicCache.__mro__[1], name)
    with pytest.raises(PipelineError, match=f"Cache has no '{name}': .*cache_edits.py needs updating"):
        cache_edits.check()


def test_a_dynamic_layer_whose_states_are_renamed_stops_with_one_line(fresh_check, monkeypatch):
    def update(self, key_states, value_states, *args, **kwargs):  # keeps its states under another name
        self.is_initialized = True
        self.key_states, self.value_states = key_states, value_states
        return key_states, value_states

    monkeypatch.setattr(DynamicLayer, "update", update)
    with pytest.raises(PipelineError, match="DynamicLayer has no 'keys'"):
        cache_edits.check()


def test_a_sliding_layer_without_its_token_count_stops_with_one_line(fresh_check, monkeypatch):
    class Renamed(DynamicSlidingWindowLayer):
        def update(self, *args, **kwargs):
            states = super().update(*args, **kwargs)
            self.tokens_seen = self.__dict__.pop("cumulative_length")  # as if transformers renamed it
            return states

    monkeypatch.setattr(cache_edits, "DynamicSlidingWindowLayer", Renamed)
    with pytest.raises(PipelineError, match="DynamicSlidingWindowLayer has no 'cumulative_length'"):
        cache_edits.check()


def test_a_layer_without_the_room_s_fields_decodes_on_stock_layers_with_one_warning(
    fresh_check, tiny_model, monkeypatch, caplog
):
    model, tokenizer = load_for_inference(tiny_model), load_tokenizer(tiny_model)
    prompts = [instruction_prompt(i, x, PROMPT) for i, x, _ in INSTRUCTIONS]
    expected = generate_answers(model, tokenizer, prompts, batch_size=3, max_new_tokens=4).texts
    cache_edits.check.cache_clear()
    lazy = DynamicLayer.lazy_initialization

    def without_dtype(self, key_states, value_states):
        lazy(self, key_states, value_states)
        del self.dtype  # as if transformers stopped recording it

    monkeypatch.setattr(DynamicLayer, "lazy_initialization", without_dtype)
    with caplog.at_level(logging.WARNING, logger="lorapipe.decoding.cache_edits"):
        answers = generate_answers(model, tokenizer, prompts, batch_size=3, max_new_tokens=4).texts
        generate_answers(model, tokenizer, prompts, batch_size=3, max_new_tokens=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "DynamicLayer has no 'dtype'" in warnings[0]
    assert answers == expected
