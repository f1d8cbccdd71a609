"""Instruction-tuning with LoRA/QLoRA as a DVC pipeline: the logic behind stages/."""

import os

__version__ = "0.1.0"

# OpenMP threads that find no work spin before they sleep: libgomp's default of 300,000 spins let one busy
# neighbour (a process in another session, which Linux gives a fair share of the CPU whatever its nice value)
# stall every parallel region's barrier while a spinning thread held the core the other thread needed: eight
# training steps ran more than 4x slower. 1,000 spins: at most about 2x, the undisturbed time unchanged
# (benchmarks/busy_neighbour.py, README: Your machine). Set before torch loads libgomp, which reads it once; a
# value of the user's own is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
