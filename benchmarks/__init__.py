"""fastlm benchmark suites (pytest-benchmark) and the report script.

Run ``pytest benchmarks --benchmark-only`` (CPU: a small grid in a few minutes; CUDA: the full
FlashAttention-style grid) and ``python -m benchmarks.report`` to turn ``benchmarks/results.jsonl``
into ``benchmarks/REPORT.md`` and ``benchmarks/plots/*.png``. See ``benchmarks/conftest.py`` for
the timing and recording rules. Plain ``pytest`` (testpaths = tests) never runs these.
"""
