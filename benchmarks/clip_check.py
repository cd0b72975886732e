"""Whether the gradient-norm clip fires where this package and the MH-pFedHN authors differ.

    python benchmarks/clip_check.py RUN_DIR [--json FILE]

RUN_DIR: an MH-pFedHN or MH-pFedHNGD run directory with a training checkpoint.
Its config is composed again from the overrides it recorded
(``.hydra/overrides.yaml``), so its data must be where it was. Two places
differ (docs/mh-pfedhn.md):

- **MH-pFedHNGD's global phase.** The authors train the global model without
  clipping; so does this package now, while runs made before clipped its steps
  at ``client.clip_norm``. For the run's initial hypernetwork and the
  checkpoint's, one global-phase pass (cross-entropy, the run's local
  optimiser and clip) on every training client: how many SGD steps the clip
  shortened, and the largest gradient norm.
- **The novel phase.** The authors clip the norm of the whole hypernetwork's
  gradient, the frozen trunk and head included; this package clips what
  trains. For the checkpoint's hypernetwork, one personal visit of every
  training client, from its trained embedding and from a fresh N(0, 0.002) one
  (as a novel client starts): the whole gradient's norm against
  ``server.clip_norm``.

Either way: when no step exceeds the clip, the two codes compute the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from pFedHN import checkpoint
from pFedHN.client import InnerLoop, derive_seed, train_inner_loop
from pFedHN.config import compose_config, data_spec
from pFedHN.dataset import ClientData, federated_data
from pFedHN.experiment import prepare
from pFedHN.models import MHHyper
from pFedHN.networks import client_architectures
from pFedHN.server import build_multihead_hypernetwork, build_strategy
from pFedHN.settings import Settings
from pFedHN.zoo import make_client_model


def run_settings(run_dir: Path) -> Settings:
    """The run's settings, from the overrides its Hydra directory recorded (less ``resume``)."""
    recorded = run_dir / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        raise SystemExit(f"{run_dir}: no .hydra/overrides.yaml; is it a pFedHN run directory?")
    overrides = [o for o in yaml.safe_load(recorded.read_text()) or []
                 if not o.startswith(("resume=", "hydra."))]
    settings = prepare(compose_config(overrides))
    if not settings.variant.multi_head:
        raise SystemExit(f"{run_dir}: a {settings.variant.name} run; this check is for "
                         "MH-pFedHN and MH-pFedHNGD runs (algorithm=mh_pfedhn or mh_pfedhngd)")
    return settings


def zoo_model(settings: Settings, name: str, theta: torch.Tensor) -> torch.nn.Module:
    """Zoo network ``name`` holding the flat ``theta`` (cut in parameter order, as clients do)."""
    model = make_client_model(name, settings.model.in_channels, settings.model.out_dim,
                              data_spec(settings, on_disk=False).image_size)
    torch.nn.utils.vector_to_parameters(theta.detach().clone(), model.parameters())
    return model


def global_phase(settings: Settings, hnet: MHHyper, global_id: int, data: list[ClientData],
                 clients: list[int]) -> dict[str, float]:
    """One global-phase pass on every client from the same global model, clipped as the run was."""
    theta = hnet(global_id)["theta"]
    loop = InnerLoop.from_settings(settings)
    steps = clipped = 0
    largest = 0.0
    for i in clients:
        model = zoo_model(settings, settings.model.global_model, theta)
        generator = torch.Generator().manual_seed(derive_seed(settings.seed, i, 0, 2))
        metrics = train_inner_loop(model, data[i], loop, generator)
        steps += metrics["steps"]
        clipped += metrics["clipped-steps"]
        largest = max(largest, metrics["largest-grad-norm"])
    return {"clip": loop.clip_norm, "steps": steps, "clipped": clipped,
            "largest_grad_norm": largest}


def whole_gradient_norms(settings: Settings, hnet: MHHyper, data: list[ClientData],
                         clients: list[int]) -> list[float]:
    """Per client: the norm of every hypernetwork gradient one visit of it produces."""
    names = client_architectures(settings)
    loop = InnerLoop.from_settings(settings)
    norms = []
    for i in clients:
        theta = hnet(i)["theta"]
        model = zoo_model(settings, names[i], theta)
        train_inner_loop(model, data[i], loop,
                         torch.Generator().manual_seed(derive_seed(settings.seed, i, 0)))
        trained = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        delta_theta = theta.detach() - trained
        params = [hnet.embeddings[i], *hnet.trunk.parameters(), *hnet.head(hnet.chunks[i])]
        grads = torch.autograd.grad(theta, params, grad_outputs=delta_theta)
        norms.append(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
    return norms


def novel_phase(settings: Settings, hnet: MHHyper, data: list[ClientData],
                clients: list[int]) -> dict[str, dict[str, float]]:
    """Whole-gradient norms from the trained embeddings, then from fresh ones."""
    clip = settings.server.clip_norm
    found = {}
    for start in ("trained embedding", "fresh embedding"):
        if start == "fresh embedding":
            with torch.no_grad():
                for i in clients:
                    hnet.embeddings[i].normal_(0.0, 0.002)
        norms = sorted(whole_gradient_norms(settings, hnet, data, clients))
        found[start] = {"clip": clip, "visits": len(norms),
                        "above_clip": sum(n > clip for n in norms),
                        "median_norm": norms[len(norms) // 2], "largest_norm": norms[-1]}
    return found


def main() -> None:
    """Measure both places for RUN_DIR; print, and write --json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    settings = run_settings(args.run_dir)
    saved = checkpoint.load(args.run_dir, settings)
    strategy = build_strategy(settings)
    strategy.load_state_dict(saved["strategy"])
    clients = strategy.schedule.clients
    data = federated_data(data_spec(settings), settings.dataset.root, settings.split)
    figures: dict = {"run": args.run_dir.name, "checkpoint_round": saved["round"]}
    if settings.variant.global_model:
        sizes = [strategy.core.client_sizes[i] for i in range(settings.partitions)]
        initial = build_multihead_hypernetwork(settings, sizes)  # as the run began
        figures["global_phase"] = {
            "round 0": global_phase(settings, initial, strategy.global_id, data, clients),
            f"round {saved['round']}": global_phase(settings, strategy.core.hnet,
                                                    strategy.global_id, data, clients)}
    figures["novel_phase"] = novel_phase(settings, strategy.core.hnet, data, clients)
    for part in ("global_phase", "novel_phase"):
        for when, found in figures.get(part, {}).items():
            print(f"{part}, {when}: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in found.items()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
