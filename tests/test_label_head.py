"""The training forward: the shared prefix once per batch and the LM head on label positions only change nothing.

Loss and LoRA gradients of the label-head forward (with and without a shared prefix) equal those of the
model's own forward with labels on the same padded batch, in fp32 with dropout 0, for batches of tweets,
of instructions and of both.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from conftest import instruction_rows, sentiment_rows, tiny_params
from lorapipe.config import parse_params
from lorapipe.models.loading import choose_hardware, load_causal_lm, load_tokenizer
from lorapipe.training.batching import grouped_batches, prefix_key
from lorapipe.training.build import lora_config, sft_config
from lorapipe.training.label_head import shared_prefix_length
from lorapipe.training.trainer import LabelHeadSFTTrainer


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    raw = tiny_params(Path("m"), Path("t.csv"), Path("i.json"))
    raw["lora"].update(dropout=0.0, target_modules="all-linear")
    raw["train"].update(cpu_precision="fp32")
    return parse_params(raw)


def make_trainer(tiny_model, params, rows, shared_prefix: bool) -> LabelHeadSFTTrainer:
    from datasets import Dataset

    hardware = choose_hardware(params.train, cuda=False)
    torch.manual_seed(0)
    config = lora_config(params.lora)
    config.init_lora_weights = False  # random B as well as A, so every LoRA weight gets a gradient
    return LabelHeadSFTTrainer(
        model=load_causal_lm(tiny_model, attention="eager"),
        args=sft_config(params.train, hardware, Path("/tmp/unused")),
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]),
        processing_class=load_tokenizer(tiny_model),
        peft_config=config,
        shared_prefix=shared_prefix,
    )


def loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


BATCHES = {
    "tweets": lambda prompt: sentiment_rows(prompt, 6),
    "instructions": lambda prompt: instruction_rows(prompt, 5),
    "mixed": lambda prompt: sentiment_rows(prompt, 3) + instruction_rows(prompt, 3),
}


@pytest.mark.parametrize("kind", BATCHES)
def test_loss_and_lora_gradients_equal_the_plain_batch(tiny_model, params, kind):
    rows = BATCHES[kind](params.prompt)
    trainer = make_trainer(tiny_model, params, rows, shared_prefix=True)
    model = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths, padded

    prefix = shared_prefix_length(batch["input_ids"], batch["labels"])
    assert prefix > (20 if kind == "tweets" else 5)  # the system turn at least; for tweets the instruction too

    def plain():  # the model's own forward and loss
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    reference, reference_grads = loss_and_grads(model, plain)
    for shared in (True, False):
        trainer.shared_prefix = shared
        loss, grads = loss_and_grads(model, lambda: trainer.compute_loss(model, batch))
        assert loss == pytest.approx(reference, rel=1e-5)
        assert grads.keys() == reference_grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            assert torch.allclose(grad, reference_grads[name], rtol=1e-4, atol=1e-6), name


def test_the_prefix_stops_before_the_last_prompt_token_of_the_earliest_answer():
    ids = torch.tensor([[1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 5, 9]])
    labels = torch.tensor([[-100, -100, -100, -100, 5, 9], [-100, -100, -100, -100, -100, 9]])
    # Every token is shared, but position 3 predicts the first answer token (5): the prefix ends before it.
    assert shared_prefix_length(ids, labels) == 3
    assert shared_prefix_length(torch.tensor([[7, 2, 3], [8, 2, 3]]), labels[:, :3]) == 0
    assert shared_prefix_length(ids[:1], labels[:1]) == 0  # one row: nothing to share


def test_batches_group_alike_prompts_and_keep_every_example_once(params):
    rows = sentiment_rows(params.prompt, 10) + instruction_rows(params.prompt, 7)
    keys = [prefix_key(r["prompt"]) for r in rows]
    assert len(set(keys[:10])) == 1 and len(set(keys[10:])) == 3
    lengths = [len(r["prompt"][-1]["content"]) for r in rows]
    batches = grouped_batches(keys, lengths, batch_size=4, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(17))
    assert all(len(b) == 4 for b in batches[:-1]) and len(batches[-1]) == 1
    tweet_batches = [b for b in batches if all(i < 10 for i in b)]
    assert len(tweet_batches) == 2  # 10 tweets fill two whole batches; the other 2 join the rest
    assert grouped_batches(keys, lengths, 4, seed=1) == batches != grouped_batches(keys, lengths, 4, seed=2)


def test_mask_dropout_is_inverted_dropout_and_replaces_peft_s():
    from peft import LoraConfig, get_peft_model

    from conftest import build_tiny_model
    from lorapipe.training.label_head import MaskDropout, use_mask_dropout

    torch.manual_seed(0)
    dropout = MaskDropout(0.25).train()
    x = torch.ones(200, 500, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    for lane in range(4):  # each 16-bit lane of the drawn integers is as likely to keep an entry
        assert abs(kept.flatten()[lane::4].float().mean().item() - 0.75) < 0.01
    assert not torch.equal(dropout(x) != 0, kept)  # a new mask every call
    assert dropout(torch.ones(3, 7)).shape == (3, 7)  # sizes that are not a multiple of four
    assert torch.all(y[kept] == 1 / 0.75)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)  # the gradient flows through the kept entries only
    assert torch.equal(dropout.eval()(x), x)

    model = get_peft_model(
        load_causal_lm(build_tiny_model(Path(tempfile.mkdtemp()) / "m")),
        LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    )
    assert use_mask_dropout(model) == 4  # two layers, two adapted modules each
    kinds = {type(m).__name__ for m in model.modules() if "lora_dropout" in str(type(m)) or isinstance(m, MaskDropout)}
    assert kinds == {"MaskDropout"}


@pytest.mark.parametrize("p", [0.05, 0.37, 0.25])
def test_mask_dropout_drops_at_its_rate_in_every_lane_independently(p):
    from lorapipe.training.label_head import MaskDropout

    torch.manual_seed(1)
    kept = (MaskDropout(p).train()(torch.ones(400, 1000)) != 0).flatten().float()
    assert abs(kept.mean().item() - (1 - p)) < 0.005
    lanes = kept.view(-1, 4)  # the four 16-bit lanes of each drawn int64
    for lane in range(4):
        assert abs(lanes[:, lane].mean().item() - (1 - p)) < 0.01, lane
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 3)):  # a lane says nothing about its neighbours
        both = (lanes[:, a] * lanes[:, b]).mean().item()
        assert abs(both - (1 - p) ** 2) < 0.01, (a, b)


def test_mask_dropout_near_one_drops_everything_without_dividing_by_zero():
    from lorapipe.training.label_head import MaskDropout

    x = torch.ones(8, 16, requires_grad=True)
    y = MaskDropout(1 - 1e-6).train()(x)
    assert torch.equal(y, torch.zeros(8, 16))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(8, 16))


def test_a_model_that_scales_its_logits_trains_with_its_own_forward(tmp_path, tiny_model, params, caplog):
    import logging

    from transformers import GraniteConfig, GraniteForCausalLM

    from lorapipe.training.label_head import label_head_agrees, supports_label_head
    from lorapipe.training.probe import probe_batch, use_label_head

    tokenizer = load_tokenizer(tiny_model)
    rows = sentiment_rows(params.prompt, 4)
    llama = load_causal_lm(tiny_model)
    assert use_label_head(llama, tokenizer, rows, params.train)
    torch.manual_seed(0)
    config = GraniteConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0, tie_word_embeddings=True,
    )  # fmt: skip
    GraniteForCausalLM(config).save_pretrained(tmp_path / "granite")
    granite = load_causal_lm(tmp_path / "granite")
    assert supports_label_head(granite)  # the config check alone does not know logits_scaling
    with caplog.at_level(logging.WARNING):
        assert not use_label_head(granite, tokenizer, rows, params.train)
    assert "label-head loss differs from GraniteForCausalLM's own loss" in caplog.text
    assert "forward" not in vars(granite)  # the check left no patch behind
    assert label_head_agrees(llama, probe_batch(tokenizer, rows, 2, 256))
