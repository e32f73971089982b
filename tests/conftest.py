"""Shared test setup: the repo root on sys.path, so `import model` works under plain `pytest` too
(and in processes spawned by tests, which inherit sys.path)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
