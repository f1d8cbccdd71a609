"""The CPU inference attention: SDPA with the key/value heads shared in the kernel gives sdpa's numbers exactly."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_attention

from lorapipe.models import decoding
from lorapipe.models.attention import SHARED_KV_SDPA
from lorapipe.models.loading import load_causal_lm, load_for_inference, load_tokenizer


def _padded_prefill(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits of a left-padded batch after a shared prefix, and the greedy tokens decoded after them."""
    prompts = [[{"role": "user", "content": text}] for text in ("good", "a much longer and happier tweet", "bad day")]
    ids = decoding.encode(tokenizer, decoding.render(tokenizer, prompts))
    prefix = decoding.Prefix(model, ids[0][: decoding.common_prefix_length(ids)])
    suffixes = [row[prefix.length :] for row in ids]
    with torch.inference_mode():
        logits, _, state = decoding._prefill(model, prefix, suffixes, tokenizer.pad_token_id)
        answers = decoding._greedy(model, logits, state, 6, {-1})
    return logits, torch.tensor(answers)


def test_shared_kv_attention_equals_sdpa_and_copies_no_heads(tiny_model, monkeypatch):
    tokenizer = load_tokenizer(tiny_model, padding_side="left")
    plain = load_causal_lm(tiny_model, attention="sdpa").eval()
    shared = load_causal_lm(tiny_model, attention=SHARED_KV_SDPA).eval()
    assert plain.config.num_key_value_heads < plain.config.num_attention_heads  # a grouped-query model
    expected_logits, expected_answers = _padded_prefill(plain, tokenizer)

    def no_copies(*args, **kwargs):
        raise AssertionError("repeat_kv called: the key/value heads were copied")

    monkeypatch.setattr(sdpa_attention, "repeat_kv", no_copies)
    logits, answers = _padded_prefill(shared, tokenizer)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(answers, expected_answers)
    with pytest.raises(AssertionError, match="repeat_kv called"):
        _padded_prefill(plain, tokenizer)  # the stock path does copy them, so the check above can fail


def test_inference_on_a_cpu_loads_the_shared_kv_attention(tiny_model):
    assert load_for_inference(tiny_model).config._attn_implementation == SHARED_KV_SDPA


@pytest.mark.parametrize("mask", ["none", "boolean", "additive"])
def test_a_decoding_step_attends_as_sdpa_does(mask):
    from lorapipe.models.attention import _grouped_step

    torch.manual_seed(0)
    rows, heads, kv_heads, keys, dim = 4, 6, 2, 9, 8
    query, key, value = (
        torch.randn(rows, heads, 1, dim),
        torch.randn(rows, kv_heads, keys, dim),
        torch.randn(rows, kv_heads, keys, dim),
    )
    attends = torch.ones((rows, 1, 1, keys), dtype=torch.bool)
    attends[0, ..., :5] = attends[2, ..., 3:6] = False  # a padded row, a row with a masked middle
    given = {"none": None, "boolean": attends}.get(mask)
    if mask == "additive":
        given = torch.zeros(attends.shape).masked_fill_(~attends, torch.finfo(torch.float32).min)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=None if mask == "none" else attends, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(_grouped_step(query, key, value, given, None), expected, rtol=1e-5, atol=1e-6)
