"""report: one Markdown report with figures from every model's metrics, predictions and training logs.

    python stages/report.py     # writes report/report.md and its PNGs

Reads only the ``report`` params (the whole params.yaml is printed in the report for the record).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.io import run_stage
from lorapipe.report import load_report_inputs, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("report"))
    args = parser.parse_args()

    def body() -> None:
        params = load_params(args.params).report
        write_report(load_report_inputs(Path("."), params), args.out)

    run_stage("report", body)


if __name__ == "__main__":
    main()
