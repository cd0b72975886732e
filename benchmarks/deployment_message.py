"""What one training message costs a SuperNode, with and without the partition cache.

    python benchmarks/deployment_message.py [--repeats 3] [--partition 0]
        [--json FILE] [Hydra overrides ...]

flwr 1.42's SuperNode runs every message in a fresh ``flwr-clientapp`` process.
Each repeat here starts a fresh Python process that does what that process
does for this package: import the app (torch, Flower, Hydra, the package),
build the node's client from its Context (read, decode and split the data; or,
with the cache, read the partition's file) and answer one training message (a
``fit`` on the model's initial weights). Flower's own part (starting the
process, connecting to the SuperNode, passing the message) is not in these
figures. Repeats alternate between the two modes; the cache is emptied first,
so the first cached message fills it and is reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(overrides: list[str], partition: int, cache_dir: str) -> None:
    """One message's work in this fresh process; prints the phases' seconds as JSON."""
    start = time.perf_counter()
    from flwr.app import Context, RecordDict

    import pFedHN.deployment  # noqa: F401 (what the ClientApp process imports)
    from pFedHN.client import client_builder
    from pFedHN.config import compose_config, load_settings

    imported = time.perf_counter()
    settings = load_settings(compose_config(overrides))
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": partition, "data-cache-dir": cache_dir})
    client = client_builder(settings, data_cache=bool(cache_dir))(context)
    built = time.perf_counter()
    theta = [p.detach().cpu().numpy() for p in client.model.parameters()]
    client.fit(theta, {"server-round": 1})
    done = time.perf_counter()
    print(json.dumps({"import_s": imported - start, "build_client_s": built - imported,
                      "fit_s": done - built}))


def message(overrides: list[str], partition: int, cache_dir: str) -> dict[str, float]:
    """Run ``child`` in a fresh interpreter; add the process's whole wall time."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", "--partition", str(partition),
                          "--cache-dir", cache_dir, *overrides],
                         check=True, capture_output=True, text=True)
    phases = json.loads(out.stdout.strip().splitlines()[-1])
    return phases | {"process_s": time.perf_counter() - start}


def main() -> None:
    """Time messages without and with the cache; print medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--partition", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.child:
        child(args.overrides, args.partition, args.cache_dir)
        return
    with tempfile.TemporaryDirectory() as cache_dir:
        first_cached = message(args.overrides, args.partition, cache_dir)  # fills the cache
        runs: dict[str, list[dict[str, float]]] = {"no cache": [], "cache": []}
        for _ in range(args.repeats):
            runs["no cache"].append(message(args.overrides, args.partition, ""))
            runs["cache"].append(message(args.overrides, args.partition, cache_dir))
    medians = {mode: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
               for mode, rs in runs.items()}
    print(f"overrides: {' '.join(args.overrides) or 'none'}; partition {args.partition}; "
          f"{args.repeats} repeats each, medians (s):")
    print("| mode | whole process | imports | build client (data) | fit |")
    print("|---|---|---|---|---|")
    for mode, m in (("no cache", medians["no cache"]), ("cache, first message", first_cached),
                    ("cache", medians["cache"])):
        print(f"| {mode} | {m['process_s']:.2f} | {m['import_s']:.2f} | "
              f"{m['build_client_s']:.2f} | {m['fit_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"overrides": args.overrides, "repeats": args.repeats,
                                         "first_cached": first_cached, **medians}, indent=2))


if __name__ == "__main__":
    main()
