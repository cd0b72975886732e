"""The target network a client trains and the hypernetwork that generates it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn


class CNNTarget(nn.Module):
    """LeNet-style client network (no batch norm, no dropout), as in the paper.

    With ``local=True`` (pFedHN-PC) the last layer is left out and ``forward``
    returns the 84-d features that the client's private ``LocalLayer`` classifies.
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_kernels: int = 16,
        out_dim: int = 10,
        input_size: int = 32,
        local: bool = False,
    ) -> None:
        super().__init__()
        # Two 5x5 valid convolutions, each followed by a 2x2 max-pool.
        side = ((input_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"input_size={input_size} is too small for CNNTarget")
        self.conv1 = nn.Conv2d(in_channels, n_kernels, 5)
        self.conv2 = nn.Conv2d(n_kernels, 2 * n_kernels, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(2 * n_kernels * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = None if local else nn.Linear(84, out_dim)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits, or the 84-d features when the head is local.

        Pooling before the ReLU gives exactly the same values and gradients as
        the paper's ReLU-then-pool (ReLU is monotone) on a quarter of the
        elements; channels-last makes the CPU convolutions and pooling faster.
        """
        x = x.contiguous(memory_format=torch.channels_last)
        x = torch.relu(self.pool(self.conv1(x)))
        x = torch.relu(self.pool(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return x if self.fc3 is None else self.fc3(x)


class LocalLayer(nn.Module):
    """pFedHN-PC's private classifier head: it never leaves the client."""

    def __init__(self, n_input: int = 84, n_output: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(n_input, n_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify the target network's features."""
        return self.fc(x)


def parameter_shapes(model: nn.Module) -> OrderedDict[str, torch.Size]:
    """Names and shapes of every tensor the hypernetwork must generate."""
    return OrderedDict((name, p.shape) for name, p in model.named_parameters())


class CNNHyper(nn.Module):
    """Hypernetwork h(v_i; phi): client embedding -> MLP -> one linear head per tensor.

    ``target_shapes`` fixes the generated tensors' names and shapes, so the
    same class serves pFedHN (every layer) and pFedHN-PC (all but the head).
    """

    def __init__(
        self,
        n_nodes: int,
        target_shapes: Mapping[str, torch.Size],
        embedding_dim: int | None = None,
        hidden_dim: int = 100,
        n_hidden: int = 3,
    ) -> None:
        super().__init__()
        if embedding_dim is None:
            embedding_dim = int(1 + n_nodes / 4)  # the authors' rule
        self.target_shapes = OrderedDict(target_shapes)
        self.embeddings = nn.Embedding(n_nodes, embedding_dim)
        layers: list[nn.Module] = [nn.Linear(embedding_dim, hidden_dim)]
        for _ in range(n_hidden):
            layers += [nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)]
        self.mlp = nn.Sequential(*layers)
        # ModuleDict keys may not contain dots.
        self.heads = nn.ModuleDict(
            {_key(name): nn.Linear(hidden_dim, shape.numel())
             for name, shape in self.target_shapes.items()}
        )

    def forward(self, partition_id: int) -> OrderedDict[str, torch.Tensor]:
        """Generate theta_i, the named weights of client ``partition_id``."""
        v_i = self.embeddings.weight[partition_id]
        features = self.mlp(v_i)
        return OrderedDict(
            (name, self.heads[_key(name)](features).view(shape))
            for name, shape in self.target_shapes.items()
        )


def _key(name: str) -> str:
    return name.replace(".", "_")
