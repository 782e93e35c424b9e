import os
import sys

# Multi-rank workers are spawned processes: make `tests/` importable for them by name.
sys.path.insert(0, os.path.dirname(__file__))
