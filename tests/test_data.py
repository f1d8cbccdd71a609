import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, tiny_params, write_instructions_json, write_tweets_csv
from lorapipe.config import MixParams, ParamsError, parse_params
from lorapipe.data.instructify import instructify
from lorapipe.data.splits import clean_tweets, mix_records, sentiment_records, split_tweets
from lorapipe.errors import PipelineError
from lorapipe.io import read_jsonl, write_json
from lorapipe.labels import LabelSet
from lorapipe.sources.tables import read_table


@pytest.fixture()
def params(tmp_path, tiny_sources):
    return parse_params(tiny_params(tmp_path / "model", tiny_sources["tweets"], tiny_sources["instructions"]))


def frame(rows):
    return pd.DataFrame(rows, columns=["sentiment", "confidence", "text"])


def test_clean_tweets_drops_neutral_unconfident_and_duplicates(params):
    raw = frame(
        [
            ("positive", "0.9", "good"),
            ("Negative ", "1.0", "bad"),
            ("neutral", "1.0", "meh"),
            ("positive", "0.2", "unsure"),
            ("negative", "", "no confidence"),
            ("positive", "0.9", "dup"),
            ("positive", "1.0", "dup"),
            ("positive", "0.9", "conflict"),
            ("negative", "0.9", "conflict"),
        ]
    )
    clean, counts = clean_tweets(raw, Path("t.csv"), params.data)
    kept = sorted(zip(clean.text, clean.label, strict=True))
    assert kept == [("bad", "negative"), ("dup", "positive"), ("good", "positive")]
    assert counts == {"read": 9, "unlisted": {"neutral": 1}, "listed": 8, "confident": 6, "unique": 3}


def test_an_unlisted_label_is_refused_when_params_say_so_and_a_missing_column_names_its_field(params):
    refuse = params.data.model_copy(update={"unlisted_labels": "refuse"})
    rows = frame([("positive", "1", "x"), ("negative", "1", "y"), ("mixed", "1", "z"), ("mixed", "1", "w")])
    with pytest.raises(
        PipelineError,
        match=r"t\.csv: label 'mixed' in column 'sentiment' \(2 rows\) is not in data\.labels.*data\.unlisted_labels",
    ):
        clean_tweets(rows, Path("t.csv"), refuse)
    assert len(clean_tweets(rows, Path("t.csv"), params.data)[0]) == 2
    with pytest.raises(PipelineError, match=r"t\.csv: no column 'text' \(data\.tweets\.text_field\)"):
        clean_tweets(frame([("positive", "1", "x")]).drop(columns="text"), Path("t.csv"), params.data)


def test_an_integer_label_column_with_a_missing_value_maps_its_numbers(params):
    data = params.data.model_copy(
        update={"tweets": params.data.tweets.model_copy(update={"label_map": {"0": "negative", "1": "positive"}})}
    )
    for column in (pd.Series([1, 0, None], dtype="Int64"), pd.Series([1.0, 0.0, float("nan")])):
        rows = pd.DataFrame({"sentiment": column, "confidence": ["1"] * 3, "text": ["x", "y", "z"]})
        clean, counts = clean_tweets(rows, Path("t.parquet"), data)
        assert sorted(zip(clean.text, clean.label, strict=True)) == [("x", "positive"), ("y", "negative")]
        assert counts["unlisted"] == {"(no label)": 1}


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_a_row_without_a_label_is_dropped_or_refused_as_params_say(params, missing):
    rows = frame([("positive", "1", "x"), ("negative", "1", "y"), (missing, "1", "z"), ("mixed", "1", "w")])
    clean, counts = clean_tweets(rows, Path("t.jsonl"), params.data)
    assert sorted(clean.text) == ["x", "y"] and counts["unlisted"] == {"(no label)": 1, "mixed": 1}
    refuse = params.data.model_copy(update={"unlisted_labels": "refuse"})
    with pytest.raises(PipelineError, match=r"t\.jsonl: row 3: no label in column 'sentiment' \(1 rows without one\)"):
        clean_tweets(rows, Path("t.jsonl"), refuse)


def test_split_is_balanced_disjoint_seeded_and_exact(params):
    rows = [
        (label, "1", f"{label} {i}")
        for label in ("positive", "negative")
        for i in range(40 if label == "positive" else 80)
    ]
    clean, _ = clean_tweets(frame(rows), Path("t.csv"), params.data)
    train, valid, test = split_tweets(clean, Path("t.csv"), params.data.split, params.data.labels)
    again, _, _ = split_tweets(clean, Path("t.csv"), params.data.split, params.data.labels)
    assert (len(train), len(valid), len(test)) == (24, 6, 12)
    assert test.label.value_counts().to_dict() == {"positive": 6, "negative": 6}
    assert train.label.value_counts().to_dict() == {"positive": 12, "negative": 12}
    assert valid.label.value_counts().to_dict() == {"positive": 3, "negative": 3}
    assert not set(train.text) & set(test.text)
    assert not set(valid.text) & (set(train.text) | set(test.text))
    assert list(train.text) == list(again.text)


def test_more_training_tweets_keep_the_same_test_set(params):
    rows = [(label, "1", f"{label} {i}") for label in ("positive", "negative") for i in range(60)]
    clean, _ = clean_tweets(frame(rows), Path("t.csv"), params.data)
    train, _, test = split_tweets(clean, Path("t.csv"), params.data.split, params.data.labels)
    bigger = params.data.split.model_copy(update={"train_size": 60})
    more, _, same_test = split_tweets(clean, Path("t.csv"), bigger, params.data.labels)
    assert list(same_test.text) == list(test.text) and len(more) == 60
    assert not set(more.text) & set(test.text)
    # The validation split is drawn last: its size changes neither the test nor the training tweets.
    no_valid = params.data.split.model_copy(update={"valid_size": 0})
    same_train, none, same = split_tweets(clean, Path("t.csv"), no_valid, params.data.labels)
    assert list(same_train.text) == list(train.text) and list(same.text) == list(test.text) and none.empty


def test_label_map_turns_numeric_labels_into_words(params):
    tweets = params.data.tweets.model_copy(update={"label_map": {0: "negative", "1": "Positive", 2: "neutral"}})
    data = params.data.model_copy(update={"tweets": tweets})
    raw = frame([("0", "1", "awful"), ("1", "1", "lovely"), (" 1", "1", "great"), ("2", "1", "meh"), ("3", "1", "?")])
    clean, counts = clean_tweets(raw, Path("t.csv"), data)
    assert sorted(zip(clean.text, clean.label, strict=True)) == [
        ("awful", "negative"),
        ("great", "positive"),  # spelled as data.labels spells it
        ("lovely", "positive"),
    ]
    assert counts["unlisted"] == {"3": 1, "neutral": 1}
    refuse = data.model_copy(update={"unlisted_labels": "refuse"})
    with pytest.raises(PipelineError, match=r"t\.csv: label '3' in column 'sentiment' \(1 rows\) is not in data"):
        clean_tweets(raw, Path("t.csv"), refuse)


def test_a_file_of_neutral_tweets_or_no_rows_blames_the_data_not_the_threshold(params):
    only_neutral = frame([("neutral", "1", "meh"), ("neutral", "1", "fine")])
    with pytest.raises(PipelineError, match=r"t\.csv: no 'positive' row with text in column 'sentiment'"):
        clean_tweets(only_neutral, Path("t.csv"), params.data)
    with pytest.raises(PipelineError, match=r"t\.csv: no rows"):
        clean_tweets(frame([]), Path("t.csv"), params.data)


def test_split_larger_than_data_and_empty_class(params):
    clean, _ = clean_tweets(
        frame([("positive", "1", f"p{i}") for i in range(5)] + [("negative", "1", f"n{i}") for i in range(5)]),
        Path("t.csv"),
        params.data,
    )
    with pytest.raises(
        PipelineError, match=r"t\.csv: data\.split\.train_size \+ valid_size \+ test_size = 42 exceeds the 10"
    ):
        split_tweets(clean, Path("t.csv"), params.data.split, params.data.labels)
    with pytest.raises(PipelineError, match=r"no 'negative' tweets left"):
        split_tweets(clean[clean.label == "positive"], Path("t.csv"), params.data.split, params.data.labels)


def test_records_are_trl_conversations(params):
    records = sentiment_records(
        pd.DataFrame({"text": ["nice"], "label": ["positive"]}), params.prompt, ["positive", "negative"]
    )
    assert records[0]["prompt"][0] == {"role": "system", "content": params.prompt.system}
    assert (
        records[0]["prompt"][1]["content"]
        == "Classify the sentiment of this tweet as positive or negative.\nTweet: nice"
    )
    three = sentiment_records(
        pd.DataFrame({"text": ["ok"], "label": ["neutral"]}), params.prompt, ["a", "b", "neutral"]
    )
    assert three[0]["prompt"][1]["content"].startswith("Classify the sentiment of this tweet as a, b or neutral.")
    assert records[0]["completion"] == [{"role": "assistant", "content": "positive"}]


def test_read_table_rejects_bytes_outside_the_encoding(tmp_path):
    path = tmp_path / "tweets.csv"
    path.write_bytes(
        "sentiment,confidence,text\npositive,1,caf\xc3\xa9 \xff\xfe\n".encode("latin-1", "ignore") + b"\xff\xfe\xfa"
    )
    with pytest.raises(
        PipelineError, match=r"tweets\.csv: bytes that are not valid utf-8 text \(data\.tweets\.encoding\)"
    ):
        read_table(path, "utf-8", "data.tweets.encoding")
    assert len(read_table(path, "latin-1")) >= 1


def test_mix_share_and_sizes():
    sentiment = [{"prompt": [], "completion": [], "label": "positive" if i % 2 else "negative"} for i in range(50)]
    instructions = [{"prompt": [], "completion": []} for _ in range(20)]
    rows, stats = mix_records(sentiment, instructions, MixParams(instruction_share=0.25, size=40, seed=1))
    assert stats["sentiment"] == 30 and stats["instructions"] == 10 and len(rows) == 40
    assert sum(r["source"] == "instruction" for r in rows) == 10
    same, _ = mix_records(sentiment, instructions, MixParams(instruction_share=0.25, size=40, seed=1))
    assert rows == same
    with pytest.raises(
        PipelineError, match=r"^instruction: holds 20 instruction records; mix\.size x mix\.instruction"
    ):
        mix_records(sentiment, instructions, MixParams(instruction_share=0.75, size=40, seed=1))


def _raw_dir(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_tweets_csv(raw / "tweets.csv")
    write_instructions_json(raw / "instructions.json")
    write_json(raw / "manifest.json", {"tweets": {"path": "tweets.csv"}, "instructions": {"path": "instructions.json"}})
    return raw


def test_instructify_writes_splits_stats_and_out_of_sample(tmp_path, params):
    out = tmp_path / "prepared"
    stats = instructify(params, _raw_dir(tmp_path), out, ROOT / "data" / "out_of_sample.yaml")
    assert stats["sentiment_train"] == {"negative": 12, "positive": 12}
    assert stats["sentiment_valid"] == {"negative": 3, "positive": 3}
    assert json.loads((out / "labels.json").read_text()) == {"labels": ["positive", "negative"]}
    assert stats["instructions_test"] == 6 and stats["instructions_train"] == 24
    test = read_jsonl(out / "sentiment_test.jsonl")
    train = read_jsonl(out / "sentiment_train.jsonl")
    assert not {r["text"] for r in test} & {r["text"] for r in train}
    assert len(read_jsonl(out / "out_of_sample.jsonl")) == 10
    assert json.loads((out / "stats.json").read_text()) == stats


def test_instructify_failure_leaves_previous_outputs(tmp_path, params):
    out = tmp_path / "prepared"
    raw = _raw_dir(tmp_path)
    instructify(params, raw, out, ROOT / "data" / "out_of_sample.yaml")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (raw / "tweets.csv").write_text("sentiment,confidence\npositive,1\n", encoding="latin-1")
    with pytest.raises(PipelineError, match=r"tweets\.csv: no column 'text'"):
        instructify(params, raw, out, ROOT / "data" / "out_of_sample.yaml")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_out_of_sample_file_is_ten_varied_instructions():
    items = yaml.safe_load((ROOT / "data" / "out_of_sample.yaml").read_text())
    assert len(items) == 10 and len({i["id"] for i in items}) == 10


def test_the_seed_tweets_from_a_parquet_stand_in_of_carblacac(tmp_path, monkeypatch, hub_stand_in):
    """Study A's tweet source: the hub's parquet export of carblacac/twitter-sentiment-analysis (text, feeling 0/1).

    A local folder laid out like the export stands in for the hub's download; fetch and instructify run as in
    the profile.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lorapipe.config import load_params
    from lorapipe.sources.fetch import fetch_data

    export = tmp_path / "carblacac" / "default" / "train"
    export.mkdir(parents=True)
    texts = [f"tweet number {i} {'so happy' if i % 2 else 'so sad'}" for i in range(40)]
    table = pa.table({"text": texts, "feeling": [i % 2 for i in range(40)]})
    pq.write_table(table, export / "0000.parquet")

    study = load_params(ROOT / "profiles" / "study-a-mistral-7b.yaml")
    source = study.data.tweets.source
    hub_stand_in.repos[source.id] = tmp_path / "carblacac"
    local_instructions = {"kind": "local", "path": str(write_instructions_json(tmp_path / "i.json", 12))}
    data = study.data.model_copy(
        update={
            "tweets": study.data.tweets.model_copy(update={"source": source}),
            "instructions": study.data.instructions.model_validate(
                {**study.data.instructions.model_dump(), "source": local_instructions, "input_field": None}
            ),
        }
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = fetch_data(data, tmp_path / "raw")
    assert manifest["tweets"]["rows"] == 40 and manifest["tweets"]["revision"] == "refs/convert/parquet"

    split = data.split.model_copy(
        update={"train_size": 20, "valid_size": 4, "test_size": 10, "instruction_test_size": 2}
    )
    params = study.model_copy(update={"data": data.model_copy(update={"split": split})})
    stats = instructify(params, tmp_path / "raw", tmp_path / "prepared", ROOT / "data" / "out_of_sample.yaml")
    assert stats["sentiment_train"] == {"negative": 10, "positive": 10}
    test = read_jsonl(tmp_path / "prepared" / "sentiment_test.jsonl")
    assert all(("happy" in r["text"]) == (r["label"] == "positive") for r in test)


def test_labels_in_another_unicode_form_or_spacing_match_the_data_and_twins_are_refused(tmp_path, tiny_sources):
    """data.labels typed in NFC, the data decomposed (NFD), a label with two inner spaces: every row matches;
    a label given once in each form is one label twice."""
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    raw = tiny_params(tmp_path / "model", tiny_sources["tweets"], tiny_sources["instructions"])
    raw["data"]["labels"] = [nfc, "not  bad"]
    data = parse_params(raw).data
    assert data.labels == [nfc, "not bad"]  # written as the pipeline reads them
    rows = frame([(nfd, "1", "x"), ("Not bad", "1", "y"), (f" {nfd.upper()} ", "1", "z"), ("not   bad", "1", "w")])
    clean, counts = clean_tweets(rows, Path("t.csv"), data.model_copy(update={"unlisted_labels": "refuse"}))
    assert sorted(zip(clean.text, clean.label, strict=True)) == [
        ("w", "not bad"),
        ("x", nfc),
        ("y", "not bad"),
        ("z", nfc),
    ]
    assert "unlisted" not in counts
    assert LabelSet(tuple(data.labels)).parse(f"The answer: {nfd}.") == nfc
    raw["data"]["labels"] = [nfc, nfd]
    with pytest.raises(ParamsError, match="are the same label \\(case, spacing and Unicode form aside\\)"):
        parse_params(raw)
