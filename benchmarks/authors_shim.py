"""Run an authors' trainer unedited, CIFAR-10 read from an image folder, its loop timed.

    python authors_shim.py --record FILE --data DIR SCRIPT [their arguments ...]

Run from the root of their checkout (``benchmarks/side_by_side.py`` does). Nothing
in their files changes; four things are patched at import, as a user serving
their own copy of the data would:

- ``torchvision.datasets.CIFAR10`` becomes torchvision's own class with its
  ``data``/``targets`` arrays filled from ``DIR/{train,test}/<class>/<image>``
  in ``ImageFolder``'s order, the order ``dataset.data=folder`` reads. Their
  split therefore draws from the same samples as ``client.partition=authors``.
- ``tqdm.trange``: the same progress bar, recording when each iteration of
  their training loop starts.
- torch's global optimizer step hook: the time of each iteration's last
  optimizer step. Their evaluation steps no optimizer, so what follows the
  last step of an iteration is evaluation and logging.
- ``display.ExperimentLogger.log`` (MH-pFL only): each round's per-client
  accuracies are kept, in their client order.

The record (JSON; seconds from this script's start) is written when their
script returns or raises: ``iterations`` [[start, last optimizer step], ...],
``ended`` (the loop's end), ``client_acc`` [[per client] per round].
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

import numpy as np

T0 = time.perf_counter()
RECORD: dict = {"iterations": [], "ended": None, "client_acc": []}


def now() -> float:
    """Seconds since this script started."""
    return time.perf_counter() - T0


def serve_cifar10_from(folder: Path) -> None:
    """Make torchvision's CIFAR10 read ``folder`` (train/ and test/ image folders)."""
    import torchvision.datasets as datasets

    class FolderCIFAR10(datasets.CIFAR10):
        def __init__(self, root, train=True, transform=None, target_transform=None,
                     download=False):
            datasets.VisionDataset.__init__(self, str(root), transform=transform,
                                            target_transform=target_transform)
            self.train = train
            listing = datasets.ImageFolder(str(folder / ("train" if train else "test")))
            self.data = np.stack([np.asarray(listing.loader(path)) for path, _ in listing.samples])
            self.targets = list(listing.targets)
            self.classes, self.class_to_idx = listing.classes, listing.class_to_idx

    datasets.CIFAR10 = FolderCIFAR10


def time_the_loop() -> None:
    """Record each training-loop iteration's start and its last optimizer step."""
    import tqdm
    from torch.optim.optimizer import register_optimizer_step_post_hook

    class TimedTqdm(tqdm.tqdm):
        def __iter__(self):
            for item in super().__iter__():
                RECORD["iterations"].append([now(), None])
                yield item
            RECORD["ended"] = now()

    tqdm.trange = lambda *args, **kwargs: TimedTqdm(range(*args), **kwargs)

    def after_step(optimizer, args, kwargs) -> None:
        if RECORD["iterations"]:
            RECORD["iterations"][-1][1] = now()

    register_optimizer_step_post_hook(after_step)


def keep_client_accuracies() -> None:
    """MH-pFL logs each round's per-client accuracies to display.ExperimentLogger."""
    if not Path("display.py").is_file():
        return
    import display

    log = display.ExperimentLogger.log

    def logged(self, values: dict) -> None:
        if "client_acc" in values:
            RECORD["client_acc"].append([float(a) for a in values["client_acc"]])
        log(self, values)

    display.ExperimentLogger.log = logged


def main() -> None:
    """Patch, then run their script as ``python SCRIPT ...`` would."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("script")
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    checkout = Path.cwd()
    script = checkout / args.script
    # as `python SCRIPT` from the checkout (with the checkout importable, as
    # `pip install -e .` of AvivSham/pFedHN makes it)
    sys.path[:0] = [str(script.parent), str(checkout)]
    serve_cifar10_from(args.data.resolve())
    time_the_loop()
    keep_client_accuracies()
    sys.argv = [str(script), *args.arguments]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        args.record.write_text(json.dumps(RECORD))


if __name__ == "__main__":
    main()
