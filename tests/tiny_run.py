"""The flags of the tests' tiny training runs: a 1-layer, 16-wide model on 16-token windows, on the CPU
(also where a GPU is visible), one thread, no progress bar and no samples. Each test file adds its own
schedule (``[*TINY_RUN, "--eval-iters", "1", ...]``); ``--device cpu`` stays first (files slice it off).
:func:`tiny_train_config` is the Python API's twin of the training flags (the model's go to the Trainer)."""

from fastlm.training.settings import TrainConfig

TINY_RUN = ["--device", "cpu", "--threads", "1", "--n-layer", "1", "--n-embd", "16", "--n-head", "2"]
TINY_RUN += ["--block-size", "16", "--batch-size", "4", "--sample-tokens", "0", "--no-progress"]


def tiny_train_config(corpus, out_dir, **schedule) -> TrainConfig:
    """A TrainConfig of the tiny run on ``corpus``: batch 4, no samples or progress bar, one CPU
    thread; ``schedule`` adds the test's steps, evaluations and any other setting."""
    base = dict(batch_size=4, sample_tokens=0, progress=False, threads=1, device="cpu")
    return TrainConfig(data=[str(corpus)], out_dir=str(out_dir), **{**base, **schedule})
