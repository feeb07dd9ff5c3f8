"""Model shapes the benchmarks use: llama2c.bench.SHAPES (random weights of the published
models' shapes), kept here for scripts that import them from benchmarks/."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama2c.bench import README_SHAPES, SHAPES  # noqa: E402,F401
