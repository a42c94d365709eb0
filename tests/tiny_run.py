"""The flags of the tests' tiny training runs: a 1-layer, 16-wide model on 16-token windows, on the CPU
(also where a GPU is visible), one thread, no progress bar and no samples. Each test file adds its own
schedule (``[*TINY_RUN, "--eval-iters", "1", ...]``); ``--device cpu`` stays first (files slice it off)."""

TINY_RUN = ["--device", "cpu", "--threads", "1", "--n-layer", "1", "--n-embd", "16", "--n-head", "2"]
TINY_RUN += ["--block-size", "16", "--batch-size", "4", "--sample-tokens", "0", "--no-progress"]
