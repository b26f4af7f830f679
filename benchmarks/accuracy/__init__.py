"""The estimator accuracy harness: synthetic GGUF shapes, llama.cpp as the oracle, comparisons.

Run `python -m benchmarks.accuracy` (see __main__.py); results in benchmarks/results/.
"""
