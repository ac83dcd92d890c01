"""A real local Redis Cluster for tests: redis-server nodes on free ports, one process each.

``LocalCluster`` starts ``masters * (1 + replicas_per_master)`` nodes with
``--cluster-enabled yes``, joins them with ``redis-cli --cluster create``, and waits until
every node agrees the cluster is healthy. Faults are real: ``kill_master`` sends SIGKILL,
``wait_failover`` waits for a replica to be promoted by the cluster itself.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

from gateway.stack import wait_for_port
from tests.harness import free_port

SLOTS = 16384


@dataclass
class LocalNode:
    """One redis-server of the cluster; ``proc`` is None while it is down."""

    port: int
    bus_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "redis.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        """A plain (non-cluster) client of this node alone; close it (``with``)."""
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1,
                           decode_responses=True, protocol=2)


class LocalCluster:
    """A Redis Cluster of local processes (Redis 7), created non-interactively.

    ``node_timeout_ms`` is ``cluster-node-timeout``: a dead master is declared failed
    after about that long, then its replica is elected (about a second more).
    """

    def __init__(self, workdir: Path, masters: int = 3, replicas_per_master: int = 1,
                 node_timeout_ms: int = 1000) -> None:
        self.workdir = workdir
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[LocalNode] = []
        exe = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if exe is None or cli is None:
            raise RuntimeError("redis-server/redis-cli not found (Debian: apt-get install redis-server)")
        self._exe = exe
        try:
            for _ in range(masters * (1 + replicas_per_master)):
                port = free_port()
                node = LocalNode(port, self._bus_port(port), workdir / f"node-{port}")
                node.workdir.mkdir(parents=True)
                self.nodes.append(node)
                self._start(node)
            for node in self.nodes:
                wait_for_port(node.port, proc=node.proc, timeout=10)
            # The first `masters` addresses become masters, the rest their replicas.
            subprocess.run([cli, "--cluster", "create", *(n.address for n in self.nodes),
                            "--cluster-replicas", str(replicas_per_master), "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """A plain ``redis://`` URL of one live master: what ``RedisCluster.from_url`` takes
        (it discovers the other nodes from it)."""
        return f"redis://127.0.0.1:{self.masters()[0].port}/0"

    @property
    def conduit_url(self) -> str:
        """The URL gateways and engines take to run on this cluster."""
        return self.url.replace("redis://", "redis+cluster://", 1)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every live node, for clients that take several seeds."""
        return [("127.0.0.1", n.port) for n in self.nodes if n.alive()]

    def node(self, port: int) -> LocalNode:
        return next(n for n in self.nodes if n.port == port)

    def masters(self) -> list[LocalNode]:
        """Live nodes that are masters now, in slot order."""
        owners = self._slot_owners()
        ports = sorted(set(owners.values()), key=lambda p: min(s for s, o in owners.items() if o == p))
        return [self.node(p) for p in ports if self.node(p).alive()]

    def replicas_of(self, port: int) -> list[LocalNode]:
        """Live replicas of the master on ``port`` (as that master's peers see it)."""
        with self._live().client() as c:
            rows = [line.split() for line in c.execute_command("CLUSTER", "NODES").splitlines()]
        master_id = next(r[0] for r in rows if r[1].split("@")[0].endswith(f":{port}"))
        ports = [int(r[1].split("@")[0].rsplit(":", 1)[1]) for r in rows if r[3] == master_id]
        return [self.node(p) for p in ports if self.node(p).alive()]

    def master_for_key(self, key: str | bytes) -> LocalNode:
        """The node serving ``key``'s slot now."""
        return self.node(self._slot_owners()[key_slot(key.encode() if isinstance(key, str) else key)])

    def kill_master(self, port: int) -> None:
        """SIGKILL the master on ``port`` (no shutdown, no goodbye to its peers)."""
        node = self.node(port)
        assert node.proc is not None and port in {m.port for m in self.masters()}, f"{port} is not a live master"
        node.proc.kill()
        node.proc.wait()
        node.proc = None

    def wait_failover(self, timeout: float = 30) -> float:
        """Wait until no slot is served by a dead node and the cluster is healthy again;
        returns the seconds waited."""
        start = time.monotonic()
        self.wait_healthy(timeout)
        return time.monotonic() - start

    def restart(self, port: int, timeout: float = 30) -> None:
        """Start the node on ``port`` again with its old identity (``nodes.conf``): a master
        that was failed over rejoins as a replica of its successor."""
        node = self.node(port)
        assert not node.alive(), f"{port} is running"
        self._start(node)
        wait_for_port(node.port, proc=node.proc, timeout=10)
        deadline = time.monotonic() + timeout
        while not self._is_replica_everywhere(node):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.address} did not rejoin as a replica within {timeout}s")
            time.sleep(0.05)
        self.wait_healthy(max(0.0, deadline - time.monotonic()))

    def heal(self, timeout: float = 30) -> None:
        """Restart every node that is down and wait until the cluster is whole again: what a
        test that kills nodes calls before it ends (the cluster is shared by the session)."""
        for node in self.nodes:
            if not node.alive():
                self.wait_failover(timeout)
                self.restart(node.port, timeout)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every live node says ``cluster_state:ok``, every slot is served by a live
        node (in every live node's view) and every live replica's link to its master is up."""
        deadline = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < deadline:
            problem = self._health_problem()
            if not problem:
                return
            time.sleep(0.05)
        raise TimeoutError(f"cluster not healthy after {timeout}s: {problem}")

    def stop(self) -> None:
        """Stop every node (SIGKILL: nothing is persisted anyway)."""
        for node in self.nodes:
            if node.proc is not None:
                node.proc.kill()
                node.proc.wait()
                node.proc = None

    def _health_problem(self) -> str:
        live = {n.port for n in self.nodes if n.alive()}
        views: dict[str, list[tuple[int, int, int]]] = {}
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                with node.client() as c:
                    info = dict(line.split(":", 1) for line in c.execute_command("CLUSTER", "INFO").splitlines()
                                if ":" in line)
                    if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                        return f"{node.address}: {info.get('cluster_state')}, {info.get('cluster_slots_ok')} slots ok"
                    view = sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in c.execute_command("CLUSTER", "SLOTS"))
                    if not {port for *_, port in view} <= live:
                        return f"{node.address} still routes slots to a dead node: {view}"
                    views[node.address] = view
                    repl = c.info("replication")
                    if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                        return f"{node.address}: replica link {repl.get('master_link_status')}"
            except redis.RedisError as exc:
                return f"{node.address}: {exc!r}"
        if len({tuple(v) for v in views.values()}) > 1:
            return f"nodes disagree on who serves which slots: {views}"
        return ""

    def _slot_owners(self) -> dict[int, int]:
        """slot -> port of the master serving it, as a live node sees it."""
        with self._live().client() as c:
            owners: dict[int, int] = {}
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                owners.update(dict.fromkeys(range(int(start), int(end) + 1), int(master[1])))
        return owners

    def _is_replica_everywhere(self, node: LocalNode) -> bool:
        for peer in self.nodes:
            if not peer.alive():
                continue
            try:
                with peer.client() as c:
                    rows = [line.split() for line in c.execute_command("CLUSTER", "NODES").splitlines()]
            except redis.RedisError:
                return False
            row = next((r for r in rows if r[1].split("@")[0] == node.address), None)
            if row is None or "slave" not in row[2].split(","):
                return False
        return True

    def _live(self) -> LocalNode:
        return next(n for n in self.nodes if n.alive())

    def _start(self, node: LocalNode) -> None:
        node.proc = subprocess.Popen(
            [self._exe, "--port", str(node.port), "--cluster-port", str(node.bus_port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             # A replica takes over however stale its last contact with the master.
             "--cluster-replica-validity-factor", "0",
             # Replicas sync at once (the default waits 5 s for more replicas to batch).
             "--repl-diskless-sync-delay", "0",
             "--save", "", "--appendonly", "no", "--dir", str(node.workdir),
             "--daemonize", "no", "--loglevel", "notice", "--logfile", str(node.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    @staticmethod
    def _bus_port(port: int) -> int:
        # The default bus port is port + 10000, which may be taken or beyond 65535.
        while (bus := free_port()) == port:
            pass
        return bus
