"""python -m lorapipe.config [params.yaml]: validate a params file before running DVC."""

import sys

from lorapipe.config.params import ParamsError, load_params

try:
    load_params(sys.argv[1] if len(sys.argv) > 1 else "params.yaml")
except ParamsError as err:
    sys.exit(f"error: {err}")
