"""Which Flower node holds which partition, asked once per Flower run.

Flower's node ids are not partition ids: every node is asked its partition id
(and its network's parameter count) through Flower's ``get_properties``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from flwr.common import GetPropertiesIns
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy


class FederationTooSmallError(RuntimeError):
    """Fewer Flower nodes than partitions: the run would wait for ever."""


def wait_for_nodes(client_manager: ClientManager, needed: int, timeout_s: float) -> None:
    """Return once ``needed`` nodes are connected; raise after ``timeout_s`` seconds.

    Flower's own ``wait_for`` waits a day by default, which is how ``flwr run .``
    on its default two-node federation used to hang on a 10-client config.
    """
    deadline = time.monotonic() + timeout_s
    while (connected := client_manager.num_available()) < needed:
        if time.monotonic() >= deadline:
            raise FederationTooSmallError(
                f"this run needs {needed} Flower nodes, one per partition (num_clients "
                f"+ novel.num_clients), but the federation has {connected} after "
                f"{timeout_s:g} s (server.node_timeout). With `flwr run .` "
                f"give the local simulation {needed} nodes: --federation-config "
                f"\"num-supernodes={needed}\"; in deployment start {needed} SuperNodes, "
                f"or lower num_clients.")
        time.sleep(0.2)


class Nodes:
    """The run's nodes by partition (``node_of``) and partitions by node id (``partition_of``)."""

    def __init__(self, partitions: int, timeout_s: float) -> None:
        self.partitions = partitions  # one node per partition
        self.timeout_s = timeout_s  # how long the first round waits for them
        self.node_of: dict[int, ClientProxy] = {}
        self.partition_of: dict[str, int] = {}
        self._client_manager: ClientManager | None = None  # the run they belong to

    def discover(self, client_manager: ClientManager, group_id: int) -> dict[int, int]:
        """Ask the nodes not known yet; return the parameter counts they report, by partition.

        A new Flower run (another client manager) starts afresh.
        """
        if client_manager is not self._client_manager:
            self.node_of, self.partition_of = {}, {}
            self._client_manager = client_manager
        if len(self.node_of) == self.partitions:
            return {}
        wait_for_nodes(client_manager, self.partitions, self.timeout_s)
        unknown = [p for cid, p in client_manager.all().items() if cid not in self.partition_of]
        ins = GetPropertiesIns(config={})
        with ThreadPoolExecutor() as pool:
            answers = list(pool.map(
                lambda proxy: proxy.get_properties(ins, timeout=None, group_id=group_id),
                unknown))
        sizes = {}
        for proxy, answer in zip(unknown, answers, strict=True):
            partition_id = int(answer.properties["partition-id"])
            if partition_id in self.node_of:
                raise RuntimeError(f"two nodes claim partition {partition_id}")
            self.node_of[partition_id] = proxy
            self.partition_of[proxy.cid] = partition_id
            sizes[partition_id] = int(answer.properties["num-parameters"])
        missing = set(range(self.partitions)) - set(self.node_of)
        if missing:
            raise RuntimeError(f"no node holds partitions {sorted(missing)}")
        return sizes

    def know(self, client_manager: ClientManager, proxies: dict[int, ClientProxy]) -> None:
        """Take these nodes as the run's, without asking them (tests, stand-ins)."""
        self._client_manager = client_manager
        self.node_of = dict(proxies)
        self.partition_of = {proxy.cid: i for i, proxy in proxies.items()}
