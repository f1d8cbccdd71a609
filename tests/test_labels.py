"""Label sets: reading answers for any labels, and classification figures for any number of them."""

import random

import pytest

from lorapipe.classification import classification_metrics, confusion_matrix
from lorapipe.errors import PipelineError
from lorapipe.io import write_json
from lorapipe.labels import LabelSet, describe, read_labels, write_labels

BINARY = LabelSet(("positive", "negative"))
TICKETS = LabelSet(("billing", "technical issue", "account access", "other"))


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("positive", "positive"),
        ("Positive.", "positive"),
        ("**negative**", "negative"),
        ("_negative_", "negative"),
        ("NEGATIVE<|im_end|>", "negative"),
        ("The sentiment is positive", "positive"),
        ("Sentiment: negative, not positive", "negative"),
        ("not sure", None),
        ("", None),
        ("The tweet is positively glowing", None),
        ("nonnegative", None),
        ("The sentiment of this", None),
    ],
)
def test_two_labels_are_read_as_the_seed_read_them(answer, label):
    assert BINARY.parse(answer) == label


@pytest.mark.parametrize(
    ("answer", "named"),
    [
        ("Technical issue.", ["technical issue"]),
        ("technical\n  issue", ["technical issue"]),  # any spacing between a label's words
        ("It is about Account Access, not billing", ["account access", "billing"]),
        ("billing billing", ["billing"]),
        ("technical", []),  # half a label is no label
        ("issue", []),
        ("billings and others", []),  # glued letters make another word
        ("Other: technical issue", ["other", "technical issue"]),
        ("no idea", []),
    ],
)
def test_multi_word_labels_are_read_whole_and_several_are_reported(answer, named):
    assert TICKETS.named(answer) == named
    assert TICKETS.parse(answer) == (named[0] if named else None)


def test_a_character_prefix_is_another_label_not_an_ambiguity():
    labels = LabelSet(("pos", "positive"))
    assert labels.parse("positive") == "positive" and labels.parse("pos.") == "pos"


def test_label_sets_that_read_ambiguously_are_refused():
    for labels, problem in (
        (("spam",), "at least two"),
        (("spam", "not spam"), "'spam' is part of 'not spam'"),
        (("good", "very good"), "'good' is part of 'very good'"),
        (("Good", "good"), "same label"),
    ):
        with pytest.raises(ValueError, match=problem):
            LabelSet(labels)


def test_labels_are_named_in_prompts_and_kept_in_their_file(tmp_path):
    assert describe(["positive", "negative"]) == "positive or negative"
    assert describe(["positive", "negative", "neutral"]) == "positive, negative or neutral"
    write_labels(tmp_path / "labels.json", TICKETS.labels)
    assert read_labels(tmp_path / "labels.json") == TICKETS
    write_json(tmp_path / "bad.json", {"labels": ["only one"]})
    with pytest.raises(PipelineError, match=r"bad\.json: field 'labels': needs at least two"):
        read_labels(tmp_path / "bad.json")


def test_two_label_figures_by_hand():
    actual = ["positive", "positive", "positive", "negative", "negative"]
    predicted = ["positive", "negative", None, "positive", "negative"]
    # TP = 1; predicted positive = 2; actual positive = 3; correct = rows 0 and 4; one answer names no label.
    scores = classification_metrics(actual, predicted, BINARY.labels)
    assert {k: scores[k] for k in ("accuracy", "f1", "precision", "recall", "no_label_rate")} == {
        "accuracy": 0.4,
        "f1": 0.4,
        "precision": 0.5,
        "recall": 0.3333,
        "no_label_rate": 0.2,
    }
    # negative: TP 1, predicted 2, actual 2 -> P 0.5, R 0.5, F1 0.5; macro F1 (0.4 + 0.5) / 2
    assert scores["per_label"]["negative"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert scores["macro_f1"] == 0.45
    assert confusion_matrix(actual, predicted, BINARY.labels) == [[1, 1, 1], [1, 1, 0]]


def test_no_label_never_counts_as_correct_even_if_named_none():
    scores = classification_metrics(["negative", "positive"], ["none", None], BINARY.labels)
    assert scores["accuracy"] == 0.0 and scores["no_label_rate"] == 1.0 and scores["precision"] == 0.0


def test_classification_metrics_needs_matching_lengths():
    with pytest.raises(ValueError, match="as many predictions"):
        classification_metrics(["positive"], [], BINARY.labels)


def test_n_class_figures_equal_scikit_learn_s():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    from sklearn.metrics import confusion_matrix as sk_confusion

    labels = TICKETS.labels
    rng = random.Random(3)
    actual = [rng.choice(labels) for _ in range(300)]
    predicted = [a if rng.random() < 0.6 else rng.choice([*labels, None]) for a in actual]
    scores = classification_metrics(actual, predicted, labels)
    filled = [p if p is not None else "none" for p in predicted]
    precision, recall, f1, _ = precision_recall_fscore_support(actual, filled, labels=list(labels), zero_division=0)
    macro = precision_recall_fscore_support(actual, filled, labels=list(labels), average="macro", zero_division=0)
    assert scores["accuracy"] == pytest.approx(accuracy_score(actual, filled), abs=1e-4)
    assert scores["macro_f1"] == pytest.approx(macro[2], abs=1e-4)
    # With more than two labels the headline F1, precision and recall are the macro averages.
    assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx(macro[:3], abs=1e-4)
    for i, label in enumerate(labels):
        assert scores["per_label"][label] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i]}, abs=1e-4
        )
    assert scores["no_label_rate"] == pytest.approx(predicted.count(None) / 300, abs=1e-4)
    expected = sk_confusion(actual, filled, labels=[*labels, "none"])[: len(labels)].tolist()
    assert confusion_matrix(actual, predicted, labels) == expected
