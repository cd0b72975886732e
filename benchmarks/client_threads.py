"""What torch threads buy a client's training step, network by network.

    python benchmarks/client_threads.py [--networks NAME ...] [--threads N ...]
        [--blocks B] [--steps S] [--json FILE]

Under the MH-pFedHN authors' protocol one client trains at a time, so a run
alone on the machine leaves every core but one idle unless the client's torch
uses them (``simulation.num_threads``, which a resume may change). For each
network this times a training step as a client takes it (a batch of 64
CIFAR-10-shaped images, forward, cross-entropy, backward, gradient clip at 50,
SGD with momentum and weight decay), at each thread count, alternated in
``--blocks`` blocks of ``--steps`` steps so that drift in the machine's speed
falls on every setting alike, and prints the median step and its ratio to the
first thread count's. Random images and labels: a step's cost does not depend
on their values. Time it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from pFedHN.zoo import make_client_model

FIVE = ["mh-cnn", "mh-vgg8", "mh-resnet10", "mh-resnet12", "mh-resnet18"]


def step_seconds(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor) -> float:
    """One local SGD step as the client takes it; its wall time."""
    start = time.perf_counter()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 50.0)
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    """Time every network at every thread count; print a table, and write --json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", default=FIVE)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    figures = {}
    print(f"| network | {' | '.join(f'{t} thread(s)' for t in args.threads)} | ratio |")
    print(f"|---|{'---|' * len(args.threads)}---|")
    for name in args.networks:
        model = make_client_model(name, 3, 10, 32)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=5e-3, momentum=0.9,
                                    weight_decay=5e-4)
        times: dict[int, list[float]] = {t: [] for t in args.threads}
        for _ in range(args.blocks):
            for threads in args.threads:
                torch.set_num_threads(threads)
                step_seconds(model, optimizer, x, y)  # warm up at this thread count
                times[threads] += [step_seconds(model, optimizer, x, y)
                                   for _ in range(args.steps)]
        medians = {t: statistics.median(v) for t, v in times.items()}
        first = args.threads[0]
        ratios = {t: medians[t] / medians[first] for t in args.threads}
        figures[name] = {"median_step_s": medians, "ratio_to_first": ratios}
        cells = " | ".join(f"{1000 * medians[t]:.1f} ms" for t in args.threads)
        print(f"| `{name}` | {cells} | {ratios[args.threads[-1]]:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "networks": figures, "threads": args.threads, "blocks": args.blocks,
            "steps": args.steps, "torch": torch.__version__,
            "cores": len(os.sched_getaffinity(0)),
        }, indent=2))


if __name__ == "__main__":
    main()
