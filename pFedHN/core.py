"""The server's side of the algorithm, without Flower: phi and the step that trains it.

phi is the hypernetwork h with its client embeddings v_i. For a client i,
``generate`` gives theta_i = h(v_i; phi); once the client has trained theta_i
and returned delta_theta_i = theta_i - theta~_i, ``update`` steps phi along

    clip( mean_i (d theta_i / d phi)^T delta_theta_i )

with the outer optimizer (SGD with momentum for pFedHN, Adam for MH-pFedHN):
one vector-Jacobian product per step. The Flower strategy (``pFedHN.strategy``)
only decides who is visited when, and moves arrays to and from the clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from pFedHN.models import CNNHyper, MHHyper
from pFedHN.settings import NovelSettings, ServerSettings


def make_optimizer(
    params: Iterable[torch.nn.Parameter], name: str, lr: float, momentum: float,
    weight_decay: float, fused_adam: bool = False, fused_sgd: bool = False,
) -> torch.optim.Optimizer:
    """The outer optimizer: SGD with momentum (pFedHN) or Adam (MH-pFedHN).

    ``fused_adam``, ``fused_sgd``: the optimizer in torch's fused kernel, one
    pass over each tensor instead of one per operation (MH-pFedHN's server
    steps a 30M-parameter head on every client visit, pFedHN's a 12M-parameter
    hypernetwork every step). Its step equals the default kernel's up to a
    float32 rounding (tested). Fused SGD fails once a parameter gets its first
    gradient after others have momentum (MH-pFedHN's per-client embeddings and
    heads): the config refuses it there.
    """
    kernel = {"fused": True} if (fused_adam if name == "adam" else fused_sgd) else {}
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kernel)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kernel)


def clip_gradients(params: Sequence[torch.nn.Parameter], max_norm: float) -> None:
    """Clip as torch's ``clip_grad_norm_`` does, bit for bit, minus its multiply by 1.

    torch always scales by its factor clamped at 1, to spare a GPU a sync; under
    ``max_norm`` that is a pass over every gradient that changes nothing, and
    MH-pFedHN's head gradient is 120 MB a visit. One sync a visit costs less.
    """
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not max_norm / (total_norm + 1e-6) >= 1:  # torch's factor (NaN too: torch scales by it)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)


class PFedHNCore:
    """phi (``hnet``: the hypernetwork and the client embeddings) and its outer optimizer.

    Built once, so the optimizer's momentum persists across rounds. ``hnet``
    stays on ``device``; arrays cross to the host only in and out of here.
    """

    def __init__(self, hnet: CNNHyper | MHHyper, server: ServerSettings,
                 device: str | torch.device = "cpu",
                 client_sizes: dict[int, int] | None = None) -> None:
        self.device = torch.device(device)
        # MH-pFedHN: the parameter counts the clients reported, which hnet generates.
        self.client_sizes = dict(client_sizes or {})
        self.hnet = hnet.to(self.device)
        self.clip_norm = server.clip_norm
        self.fused_adam, self.fused_sgd = server.fused_adam, server.fused_sgd
        self.optimizer = make_optimizer(self.hnet.parameters(), server.optimizer, server.lr,
                                        server.momentum, server.wd, server.fused_adam,
                                        server.fused_sgd)

    # --- the algorithm -------------------------------------------------------------
    def generate(self, partition_id: int) -> list[np.ndarray]:
        """theta_i as the list of arrays a client loads, in the target's order."""
        with torch.no_grad():
            return [t.cpu().numpy() for t in self.hnet(partition_id).values()]

    def generate_many(self, partition_ids: Sequence[int]) -> list[list[np.ndarray]]:
        """``generate`` for several clients; batched where the hypernetwork can."""
        if not hasattr(self.hnet, "forward_many"):
            return [self.generate(i) for i in partition_ids]
        with torch.no_grad():
            return [[t.cpu().numpy() for t in theta.values()]
                    for theta in self.hnet.forward_many(list(partition_ids))]

    def update(
        self, partition_ids: Sequence[int], delta_thetas: Sequence[list[np.ndarray]]
    ) -> None:
        """Step phi along clip(mean_i (d theta_i / d phi)^T delta_theta_i) with the outer optimizer.

        One vector-Jacobian product over all the clients given; with the
        authors' one client per step it is exactly their update.
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        deltas = [[torch.from_numpy(d).to(self.device) for d in delta_theta]
                  for delta_theta in delta_thetas]
        # Unused parameters (MH-pFedHN: other clients' embeddings and heads) get no
        # gradient, so the optimizer leaves them alone, weight decay included.
        if len(partition_ids) == 1:
            # The hypernetwork's own VJP: MH-pFedHN's writes the head's part out,
            # several times faster than autograd (docs/performance.md).
            grads_of = self.hnet.vjp(partition_ids[0], deltas[0], set(params))
            grads = [grads_of.get(p) for p in params]
        else:
            thetas = [t for i in partition_ids for t in self.hnet(i).values()]
            grads = torch.autograd.grad(thetas, params, allow_unused=True,
                                        grad_outputs=[d for ds in deltas for d in ds])
            grads = [None if g is None else g / len(partition_ids) for g in grads]
        for param, grad in zip(params, grads, strict=True):
            # Contiguous: torch's fused CPU Adam (2.14) misreads strided gradients, such
            # as those of MH-pFedHN's batched heads, and they slow every kernel down.
            param.grad = None if grad is None else grad.contiguous()
        clip_gradients(params, self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def update_global(self, global_id: int, delta_thetas: Sequence[list[np.ndarray]],
                      num_examples: Sequence[int]) -> None:
        """MH-pFedHNGD's global phase: one step of the global model's virtual client.

        On the sample-weighted mean of the clients' deltas of the global model.
        """
        weighted = [np.average(tensors, axis=0, weights=num_examples).astype(np.float32)
                    for tensors in zip(*delta_thetas, strict=True)]
        self.update([global_id], [weighted])

    def learn_embeddings_only(self, training_ids: Sequence[int], novel_ids: Sequence[int],
                              novel: NovelSettings, momentum: float) -> None:
        """Novel clients: from now on step only their embeddings, the rest frozen.

        SGD (``momentum``) or Adam (the MH-pFedHN authors'), without weight
        decay, so other clients' embeddings, which get no gradient, do not
        move. MH-pFedHN: a novel client whose size no training client has (an
        unseen architecture) also trains its head, never trained before; the
        trunk stays frozen.
        """
        trainable = list(self.hnet.embeddings.parameters())
        if isinstance(self.hnet, MHHyper):
            seen = {self.hnet.chunks[i] for i in training_ids}
            unseen = {self.hnet.chunks[i] for i in novel_ids} - seen
            trainable += [p for n in sorted(unseen) for p in self.hnet.head(n)]
        self.optimizer = make_optimizer(trainable, novel.optimizer, novel.lr, momentum,
                                        weight_decay=0.0, fused_adam=self.fused_adam,
                                        fused_sgd=self.fused_sgd)

    # --- what a client may send --------------------------------------------------
    def check_delta(self, delta_theta: list[np.ndarray], partition_id: int) -> str | None:
        """Why a client's delta_theta cannot be used, or None when it can."""
        expected = self.hnet.shapes(partition_id)
        shapes = list(expected.values())
        if len(delta_theta) != len(shapes):
            return f"{len(delta_theta)} tensors, expected {len(shapes)}"
        for name, delta, shape in zip(expected, delta_theta, shapes, strict=True):
            if tuple(delta.shape) != tuple(shape):
                return f"{name} has shape {tuple(delta.shape)}, expected {tuple(shape)}"
            if not np.isfinite(delta).all():
                return f"{name} has non-finite values"
        return None

    def num_parameters(self, partition_id: int) -> int:
        """The size of theta_i: all the server knows of client i's network."""
        return sum(shape.numel() for shape in self.hnet.shapes(partition_id).values())

    def memory_bytes(self) -> dict[str, int]:
        """What the server holds for the algorithm: the hypernetwork and its optimizer state."""
        def nbytes(tensors: Iterable[Any]) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

        return {"hypernetwork_bytes": nbytes(self.hnet.parameters()),
                "optimizer_state_bytes": nbytes(t for state in self.optimizer.state.values()
                                                for t in state.values())}

    def check_sizes(self, reported: dict[int, int]) -> None:
        """Refuse clients whose parameter counts are not those generated for them."""
        changed = {i: (self.client_sizes[i], k) for i, k in reported.items()
                   if self.client_sizes.get(i, k) != k}
        if changed:
            raise RuntimeError("clients report other parameter counts than the hypernetwork "
                               f"generates (partition: (generated, reported)): {changed}")

    # --- state ---------------------------------------------------------------------
    def model_state(self) -> dict[str, Any]:
        """What generates every client's weights: phi (and MH-pFedHN's sizes)."""
        return {"client_sizes": self.client_sizes, "hnet": self.hnet.state_dict()}

    def load_model_state(self, state: dict[str, Any]) -> None:
        """Phi as a ``model_state`` (or a whole ``state``) has it."""
        self.hnet.load_state_dict(state["hnet"])

    def state(self) -> dict[str, Any]:
        """Phi and the outer optimizer's state, for a checkpoint."""
        return self.model_state() | {"optimizer": self.optimizer_state()}

    def optimizer_state(self) -> dict[str, Any]:
        """The outer optimizer's state, for a checkpoint."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, saved: dict[str, Any]) -> None:
        """The optimizer as saved; its groups name the kernel it ran with: use ours."""
        kernel = {"fused": self.optimizer.param_groups[0].get("fused"), "foreach": None}
        groups = [group | kernel for group in saved["param_groups"]]
        self.optimizer.load_state_dict(saved | {"param_groups": groups})
