"""The sweep's grid from DVC's -S value syntax, its experiment names, and its one-line refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from lorapipe.cluster.grid import expand, split_values
from lorapipe.cluster.sweep import queue_states
from lorapipe.errors import PipelineError


def test_commas_split_values_except_inside_brackets_and_quotes():
    assert split_values("4,8,16") == ["4", "8", "16"]
    assert split_values("[a,b],[c]") == ["[a,b]", "[c]"]
    assert split_values("'x,y',z") == ["'x,y'", "z"]


def test_every_combination_is_one_named_experiment_with_its_assignments():
    points = expand(["lora.r=4,8", "train.learning_rate=1e-3,2e-3,5e-3"], "sweep")
    assert len(points) == 6
    assert points[0].name == "sweep-lora.r-4-train.learning_rate-1e-3"
    assert points[-1].set_params() == ["-S", "lora.r=8", "-S", "train.learning_rate=5e-3"]
    assert len({point.name for point in points}) == 6
    # A list value stays one value, and its name is ref-safe.
    (point,) = expand(["data.labels=[good,bad]"], "s")
    assert point.set_params() == ["-S", "data.labels=[good,bad]"] and point.name == "s-data.labels-_good_bad_"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([], "no -S option"),
        (["lora.r"], "-S lora.r: expected key=value"),
        (["lora.r=4,"], "-S lora.r=4,: expected key=value"),
        (["lora.r=4,4"], "a value is listed twice"),
        (["lora.r=4", "lora.r=8"], "lora.r is given twice"),
    ],
)
def test_a_bad_option_is_one_line(options, message):
    with pytest.raises(PipelineError, match=message):
        expand(options, "sweep")


def test_queue_status_rows_give_each_experiments_state():
    status = (
        "Task     Name          Created    Status\n"
        "1a2b3c   sweep-r-4     10:00 AM   Success\n"
        "9f8e7d   sweep-r-8     10:01 AM   Failed\n"
    )
    assert queue_states(status, {"sweep-r-4", "sweep-r-8", "sweep-r-16"}) == {
        "sweep-r-4": "Success",
        "sweep-r-8": "Failed",
        "sweep-r-16": "Queued",
    }


def test_help_documents_both_engines():
    shown = subprocess.run(
        [sys.executable, "-m", "lorapipe.cli.sweep", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert (
        "--engine {queue,ray}" in shown and "queue  `dvc exp run --queue`" in shown and "ray    one Ray task" in shown
    )
