"""Train every ``data`` x ``algorithm`` preset whose data is present, briefly; print a table.

    python benchmarks/presets.py --root mnist=DIR --root cifar10=DIR [--clients 10]
        [--visits 12] [--algorithms NAME ...] [--out outputs/presets] [Hydra overrides ...]

A check that each preset trains, not a reproduction: every preset runs with
``--clients`` clients for ``--visits`` visits per client (pFedHN: one client a
round, so clients x visits rounds; MH-pFedHN: every client every round, so
``--visits`` rounds), as a new user would run it (``python -m pFedHN.main
data=... algorithm=...``). ``--root NAME=DIR`` says where a dataset is; a
dataset without one is listed as not run. A folder holding ``train/`` and
``test/`` image folders stands in for CIFAR-10 (e.g. a JPEG copy). The table
gives test accuracy at the best-validation round, the split's majority-class
level (what a run that learnt nothing beyond each client's label mix scores)
and the run's own training check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
CIFAR10_NORMALISATION = ["dataset.mean=[0.4914,0.4822,0.4465]",
                         "dataset.std=[0.2023,0.1994,0.2010]"]


def presets(group: str) -> list[str]:
    """The preset names of one config group (conf/<group>/*.yaml)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def data_overrides(data: str, root: Path) -> list[str]:
    """Point a data preset at ``root``; an image-folder copy of CIFAR-10 stands in for it."""
    overrides = [f"dataset.root={root}", "dataset.download=false"]
    if data == "cifar10" and (root / "train").is_dir() and (root / "test").is_dir():
        overrides += ["dataset.data=folder", "dataset.paper_dataset=cifar10",
                      *CIFAR10_NORMALISATION]
    return overrides


def run_preset(data: str, algorithm: str, root: Path, args: argparse.Namespace) -> dict:
    """One short run through ``python -m pFedHN.main``; its results.json, or the error."""
    every_client = algorithm.startswith("mh_")  # MH presets visit every client each round
    rounds = args.visits if every_client else args.visits * args.clients
    run_dir = Path(args.out).resolve() / f"{data}_{algorithm}"
    command = [sys.executable, "-m", "pFedHN.main", f"data={data}", f"algorithm={algorithm}",
               f"num_clients={args.clients}", f"num_rounds={rounds}",
               f"eval_every={max(1, rounds // 4)}", *data_overrides(data, root),
               *args.overrides, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1], "rounds": rounds}
    summary = json.loads((run_dir / "results.json").read_text())
    return summary | {"rounds": rounds, "elapsed_s": elapsed}


def row(data: str, algorithm: str, result: dict | None) -> str:
    """One line of the table."""
    if result is None:
        return f"| {data} | {algorithm} | | | | | not run (no --root {data}) |"
    if "error" in result:
        return f"| {data} | {algorithm} | {result['rounds']} | | | | error: {result['error']} |"
    majority = result["split"]["majority_class_acc"]["test"]
    return (f"| {data} | {algorithm} | {result['rounds']} | "
            f"{100 * result['test_acc_at_best_val']:.2f} | {100 * majority:.2f} | "
            f"{result['elapsed_s'] / 60:.1f} | {result['training_check'].get('status')} |")


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run the presets, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", action="append", default=[], metavar="NAME=DIR",
                        help="where the data preset NAME finds its data (repeatable)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--visits", type=int, default=12, help="visits per client")
    parser.add_argument("--out", default="outputs/presets", help="run directories")
    parser.add_argument("--algorithms", nargs="+", default=presets("algorithm"),
                        choices=presets("algorithm"), help="only these algorithm presets")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    roots = {}
    for item in args.root:
        name, sep, folder = item.partition("=")
        if not sep or name not in presets("data"):
            parser.error(f"--root {item}: expected NAME=DIR with NAME one of {presets('data')}")
        roots[name] = Path(folder).expanduser().resolve()

    print(f"{args.clients} clients, {args.visits} visits per client; extra overrides: "
          f"{' '.join(args.overrides) or 'none'}\n")
    print("| data | algorithm | rounds | test acc. at best val (%) | majority class (%) "
          "| minutes | training check |")
    print("|---|---|---|---|---|---|---|")
    for data in presets("data"):
        for algorithm in presets("algorithm"):
            if algorithm not in args.algorithms:
                print(f"| {data} | {algorithm} | | | | | not run (--algorithms) |", flush=True)
                continue
            result = run_preset(data, algorithm, roots[data], args) if data in roots else None
            print(row(data, algorithm, result), flush=True)


if __name__ == "__main__":
    main()
