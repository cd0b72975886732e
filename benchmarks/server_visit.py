"""What the server's part of one MH-pFedHN client visit costs, and the written-out VJP's share.

    python benchmarks/server_visit.py [--networks cnn|five] [--visits N] [--json FILE]

The authors' protocol steps the hypernetwork after every client visit: generate
theta_i, take the VJP of the client's delta_theta, clip, one Adam step. Their
heads make that costly: one Linear(128, 3072) per chunk of theta_i (30 M
numbers for their CNN). ``MHHyper.vjp`` writes the head's part of the VJP out
instead of asking autograd. In one process, alternating visit by visit (one
thread, as a long run's server has), this prints the medians of

- the gradient alone: autograd through ``forward`` against ``MHHyper.vjp``, and
  the largest difference between the two;
- a whole visit as the strategy does it now (generate, VJP, clip, Adam step).

``--networks cnn``: 50 clients with the authors' CNN (CIFAR-10 sizes);
``five``: ten each of their CNN, VGG8, ResNet10, ResNet12 and ResNet18.
Random deltas: the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pFedHN.config import compose_config, load_settings
from pFedHN.core import PFedHNCore
from pFedHN.models import MHHyper
from pFedHN.zoo import make_client_model

NETWORKS = {"cnn": ["mh-cnn"], "five": ["mh-cnn", "mh-vgg8", "mh-resnet10", "mh-resnet12",
                                        "mh-resnet18"]}


def main() -> None:
    """Time both gradients and a whole visit; print, and write --json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", choices=sorted(NETWORKS), default="cnn")
    parser.add_argument("--visits", type=int, default=12, help="timed visits of each kind")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = NETWORKS[args.networks]
    counts = [sum(p.numel() for p in make_client_model(n, 3, 10, 32).parameters())
              for n in names]
    sizes = [k for k in counts for _ in range(50 // len(names))]
    torch.manual_seed(0)
    # The MH-pFedHN preset's outer optimizer: Adam, lr 2e-4, no decay, the fused kernel.
    server = load_settings(compose_config(["algorithm=mh_pfedhn"]), on_disk=False).server
    core = PFedHNCore(MHHyper(sizes), server)
    hnet, rng = core.hnet, np.random.default_rng(0)
    params = list(hnet.parameters())
    times: dict[str, list[float]] = {"autograd_gradient_s": [], "written_out_gradient_s": [],
                                     "visit_s": []}
    largest_difference = 0.0
    for visit in range(args.visits + 2):  # the first two warm up
        i = int(rng.integers(len(sizes)))
        delta = torch.from_numpy(rng.normal(0, 1e-3, sizes[i]).astype(np.float32))
        start = time.perf_counter()
        by_autograd = torch.autograd.grad(hnet(i)["theta"], params, delta, allow_unused=True)
        by_autograd = [None if g is None else g.contiguous() for g in by_autograd]
        middle = time.perf_counter()
        written_out = hnet.vjp(i, [delta], set(params))
        end = time.perf_counter()
        largest_difference = max(largest_difference, *(
            (written_out[p] - g).abs().max().item()
            for p, g in zip(params, by_autograd, strict=True) if g is not None))
        del by_autograd, written_out
        visit_start = time.perf_counter()
        core.generate(i)
        core.update([i], [[delta.numpy()]])
        visit_end = time.perf_counter()
        if visit >= 2:
            times["autograd_gradient_s"].append(middle - start)
            times["written_out_gradient_s"].append(end - middle)
            times["visit_s"].append(visit_end - visit_start)
    figures = {k: statistics.median(v) for k, v in times.items()}
    figures |= {"autograd_over_written_out": figures["autograd_gradient_s"]
                / figures["written_out_gradient_s"],
                "largest_gradient_difference": largest_difference,
                "networks": args.networks, "clients": len(sizes), "visits": args.visits,
                "hypernetwork_parameters": sum(p.numel() for p in params)}
    for key, value in figures.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
