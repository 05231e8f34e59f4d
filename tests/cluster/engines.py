"""A real multi-host Docker Swarm on one machine, for tests.

Each node is a `dockerd` of its own, in a network namespace of its own and in a private mount namespace where the
node's host folder `<root>/node{i}` is bind-mounted at the constant path /srv/workbench, the engine's socket is
/srv/workbench/docker.sock (so `<root>/node{i}/docker.sock` on the host), /etc/docker is the node's own and /run/docker
and /run/containerd are fresh tmpfs (lost when the node dies, as a host's /run is). A container that binds
/srv/workbench therefore gets its own node's folder and engine socket: one stack file serves every node.

The nodes' interfaces hang on a bridge in a "switch" namespace of the cluster; the host reaches them through a veth
with the address .254. The bridge is not in the host's namespace because there `br_netfilter` hands bridged frames to
the host's iptables, whose FORWARD policy (set by the host's Docker) drops them, and the host's firewall is not ours.

Everything is named `wbs-<token>-…` (token: 8 random hex digits) and recorded in /run/workbench-swarm/<token>.json
with the owner's pid, so `cleanup_stale()` finds and removes what a run that died left behind, and never touches a
live run's cluster.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType

import docker
from docker import DockerClient

try:
    from deploy.images import copy_images
except ImportError:  # the repository root is not on sys.path (pytest puts tests/ there)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from deploy.images import copy_images

PREFIX = "wbs-"
MOUNT_POINT = "/srv/workbench"  # each node's folder, as its engine and its containers see it
REGISTRY = Path("/run/workbench-swarm")
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SUBNET = "10.213.{}.0/24"
HOST_OCTET = 254
SWARM_PORT = 2377
REQUIRED = ("dockerd", "nsenter", "unshare", "ip", "mount", "umount")
TMPFS_SIZE = "6g"  # the most one node's in-memory data root may take (it takes what it holds)
TMPFS_HEADROOM = 4 * 2**30  # memory left to everything else when the data roots are in memory
TMPFS_PER_NODE = 2 * 2**30

# Runs in the node's new mount and UTS namespaces, then becomes dockerd: names the host node{i}, drops every mount
# the node does not need (the host's containers, other tests' workspaces, other namespaces' files, so the node pins
# none of them), then mounts the node's own folder, /etc/docker, /run/docker and /run/containerd.
_SETUP = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
hostname, folder, etc, root, *command = sys.argv[1:]
def call(result, what):
    if result != 0:
        raise OSError(ctypes.get_errno(), what + ": " + os.strerror(ctypes.get_errno()))
def needed(point):
    if point == "/" or any(point == k or point.startswith(k + "/") for k in ("/proc", "/sys", "/dev")):
        return True
    return root == point or root.startswith(point + "/") or point.startswith(root + "/")
with open("/proc/self/mountinfo") as table:
    points = [line.split()[4].encode().decode("unicode_escape") for line in table]
for point in points:
    if not needed(point):
        libc.umount2(point.encode(), 2)  # MNT_DETACH; a point under one already detached is gone with it
for source, target, kind, flags, data in (
    (folder, "/srv/workbench", "", 4096, ""),  # MS_BIND
    (etc, "/etc/docker", "", 4096, ""),
    ("tmpfs", "/run/docker", "tmpfs", 0, "mode=0711"),
    ("tmpfs", "/run/containerd", "tmpfs", 0, "mode=0711"),
):
    os.makedirs(target, exist_ok=True)
    call(libc.mount(source.encode(), target.encode(), kind.encode(), flags, data.encode()), "mount " + target)
call(libc.sethostname(hostname.encode(), len(hostname.encode())), "sethostname")
os.execvp(command[0], command)
"""


class ClusterError(RuntimeError):
    """The cluster could not be built, or a node did not do what it was asked in time."""


def missing_tools() -> list[str]:
    """The programs a cluster needs that this machine lacks."""
    return [tool for tool in REQUIRED if shutil.which(tool) is None]


def _run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def _wait(what: str, predicate: Callable[[], bool], timeout: float, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            yield int(name)


def _ns(pid: int, kind: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _netns_id(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _in_cgroup(pid: int, names: Iterable[str]) -> bool:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    paths = [line.split(":", 2)[2] for line in lines if line.count(":") >= 2]
    return any(p == f"/{n}" or p.startswith(f"/{n}/") for p in paths for n in names)


def _netns_names(token: str | None = None) -> list[str]:
    prefix = f"{PREFIX}{token}-" if token else PREFIX
    with contextlib.suppress(OSError):
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    return []


def _host_links(token: str | None = None) -> list[str]:
    prefix = f"{PREFIX}{token}" if token else PREFIX
    out = _run("ip", "-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2]
    return [n for n in names if n.startswith(prefix)]


def _cgroup_dirs(token: str | None = None) -> list[Path]:
    prefix = f"{PREFIX}{token}-" if token else PREFIX
    found: list[Path] = []
    with contextlib.suppress(OSError):
        for hierarchy in CGROUP_ROOT.iterdir():
            with contextlib.suppress(OSError):
                found += [d for d in hierarchy.iterdir() if d.name.startswith(prefix) and d.is_dir()]
    return found


def _remove_cgroups(token: str) -> None:
    """rmdir the nodes' cgroups (cgroupfs leaves /NAME and /NAME/<container> behind), children first."""
    for top in _cgroup_dirs(token):
        for attempt in range(20):
            for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
            if not top.exists():
                break
            time.sleep(0.1 * (attempt + 1))


def _processes(token: str, netns: Iterable[tuple[int, int]] = (), root: Path | None = None) -> list[int]:
    """Every process of a cluster: in one of its network namespaces, in its cgroups (the containers), naming it on
    its command line (dockerd's --cgroup-parent and --data-root), or sharing a mount namespace with one of those
    (containerd, the shims, fuse-overlayfs)."""
    nets = set(netns) | {ns for n in _netns_names(token) if (ns := _netns_id(n))}
    cgroups = [f"{PREFIX}{token}-n{i}" for i in range(1, 100)]
    marks = [f"/{PREFIX}{token}-"] + ([str(root)] if root else [])
    found, mounts = set(), set()
    for pid in _pids():
        cmdline = _cmdline(pid)
        if _ns(pid, "net") in nets or any(m in cmdline for m in marks) or _in_cgroup(pid, cgroups):
            found.add(pid)
            if (mnt := _ns(pid, "mnt")) and mnt != _ns(os.getpid(), "mnt"):
                mounts.add(mnt)
    if mounts:
        found |= {pid for pid in _pids() if _ns(pid, "mnt") in mounts}
    return sorted(found)


def _kill(token: str, netns: Iterable[tuple[int, int]] = (), root: Path | None = None, timeout: float = 60) -> None:
    """SIGKILL every process of the cluster (as a power cut would) until none is left."""
    netns = list(netns)
    deadline = time.monotonic() + timeout
    while pids := _processes(token, netns, root):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:  # reap those that are our children; the others are reaped by init
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            raise ClusterError(f"processes of {PREFIX}{token} still alive: {pids}")
        time.sleep(0.2)


def _mounts_under(root: Path, pids: Iterable[int] | None = None) -> list[str]:
    """Mount points under `root` in the mount table of each process of `pids` (default: this one)."""
    prefix = str(root).rstrip("/") + "/"
    found: set[str] = set()
    for pid in pids if pids is not None else ["self"]:
        try:
            lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            if (point + "/").startswith(prefix) or (fields[3] + "/").startswith(prefix):
                found.add(f"{point} (pid {pid})")
    return sorted(found)


def _unmount_under(root: Path) -> None:
    prefix = str(root).rstrip("/") + "/"
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    points = [line.split()[4].encode().decode("unicode_escape") for line in lines]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        _run("umount", "-l", point, check=False)


def _remove_tree(path: Path) -> None:
    for _ in range(3):
        try:
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)
            elif path.exists():
                shutil.rmtree(path)
            return
        except FileNotFoundError:
            continue  # another cleanup is removing it too


def _teardown(token: str, root: Path | None, netns: Iterable[tuple[int, int]] = (), size: int = 0) -> None:
    """Remove all of a cluster, gracefully or not: its processes, cgroups, namespaces, links, mounts, folders."""
    _kill(token, netns, root)
    _remove_cgroups(token)
    for link in _host_links(token):  # at once, where a namespace's interfaces go when the kernel gets to it
        _run("ip", "link", "delete", link, check=False)
    for name in _netns_names(token):
        _run("ip", "netns", "delete", name, check=False)
    with contextlib.suppress(ClusterError):
        _wait(f"the links of {PREFIX}{token} to go", lambda: not _host_links(token), 30)
    if root is not None:
        _unmount_under(root)
        names = {f"node{i}" for i in range(1, size + 1)} | {f"engine{i}" for i in range(1, size + 1)}
        with contextlib.suppress(OSError):
            names |= {p.name for p in root.iterdir() if re.fullmatch(r"(node|engine)\d+|\.storage-probe", p.name)}
        for name in sorted(names):
            _remove_tree(root / name)
    with contextlib.suppress(FileNotFoundError):
        (REGISTRY / f"{token}.json").unlink()


def _record(token: str) -> dict[str, object] | None:
    try:
        value = json.loads((REGISTRY / f"{token}.json").read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _owner_alive(record: dict[str, object]) -> bool:
    pid = record.get("owner")
    return isinstance(pid, int) and _start_time(pid) == record.get("owner_start")


def cleanup_stale(progress: Callable[[str], None] = print) -> list[str]:
    """Remove what earlier runs that died half-way left (by the `wbs-` prefix); a cluster whose owner process is
    alive is left alone. Returns the tokens removed."""
    pattern = re.compile(rf"^{PREFIX}([0-9a-f]{{8}})")
    tokens = {m.group(1) for n in _netns_names() + _host_links() if (m := pattern.match(n))}
    tokens |= {m.group(1) for d in _cgroup_dirs() if (m := pattern.match(d.name))}
    with contextlib.suppress(OSError):
        tokens |= {path.stem for path in REGISTRY.glob("*.json")}
    removed = []
    for token in sorted(tokens):
        record = _record(token) or {}  # read now: a cluster records itself before it makes anything
        if _owner_alive(record):
            continue
        root = Path(str(record["root"])) if record.get("root") else None
        progress(f"removing the leftovers of swarm test cluster {token} (root {root})")
        _teardown(token, root, size=int(str(record.get("size", 0))))
        removed.append(token)
    return removed


def leftovers(token: str, root: Path, netns: Iterable[tuple[int, int]] = ()) -> list[str]:
    """What of cluster `token` is still on this machine (empty when it is all gone): namespaces, links, processes,
    cgroups, mounts under `root` in any process's mount table, folders, its registry record."""
    found = [f"netns {n}" for n in _netns_names(token)]
    found += [f"link {n}" for n in _host_links(token)]
    pids = _processes(token, netns, root)
    found += [f"process {pid}: {_cmdline(pid)[:200]}" for pid in pids]
    found += [f"cgroup {d}" for d in _cgroup_dirs(token)]
    found += [f"mount {m}" for m in _mounts_under(root, [*_pids(), os.getpid()])]
    found += [f"folder {p}" for p in sorted(root.glob("node*")) + sorted(root.glob("engine*"))]
    if (REGISTRY / f"{token}.json").exists():
        found.append(f"record {REGISTRY / f'{token}.json'}")
    return found


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def storage_driver(root: Path) -> str:
    """The best storage driver that works for an engine whose data root is under `root`: overlay2 if the kernel
    mounts overlayfs there, else fuse-overlayfs, else vfs (slow, copies every layer)."""
    probe = root / ".storage-probe"
    dirs = {name: probe / name for name in ("lower", "upper", "work", "merged")}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    try:  # in a mount namespace of its own, so the mount goes with it
        ok = _run("unshare", "--mount", "mount", "-t", "overlay", "overlay", "-o", options, str(dirs["merged"]),
                  check=False).returncode == 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if ok:
        return "overlay2"
    if shutil.which("fuse-overlayfs") and Path("/dev/fuse").exists():
        return "fuse-overlayfs"
    return "vfs"


@dataclass
class Node:
    """One host of the cluster: its network namespace, its folders and its engine."""

    index: int
    token: str
    root: Path
    address: str
    process: subprocess.Popen[bytes] | None = None
    netns_id: tuple[int, int] | None = None
    client: DockerClient | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.token}-n{self.index}"

    @property
    def folder(self) -> Path:
        """The host folder that is /srv/workbench on this node."""
        return self.root / f"node{self.index}"

    @property
    def state(self) -> Path:
        """The engine's own files (data root, config, /etc/docker, log, pid file): not visible to containers."""
        return self.root / f"engine{self.index}"

    @property
    def socket(self) -> Path:
        return self.folder / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log(self) -> Path:
        return self.state / "dockerd.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Cluster:
    """A Docker Swarm of `size` engines on this machine (see the module's doc), as a context manager.

    Nodes are numbered from 1 (`node(1)` is the first manager); `managers` of them are managers (default: all, so the
    swarm keeps its quorum when any one node dies and every node's engine accepts service commands), the others
    workers. The engines' data roots are tmpfs mounts under `root` when `tmpfs` is true, or None and memory allows
    (an image loads faster there and the data goes in an instant, not in a minute of unlinking); they survive a
    killed engine either way.
    """

    def __init__(
        self,
        size: int = 3,
        root: Path | None = None,
        *,
        managers: int | None = None,
        driver: str | None = None,
        heartbeat: float = 2.0,
        tmpfs: bool | None = None,
        timeout: float = 180.0,
        progress: Callable[[str], None] = print,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.token = secrets.token_hex(4)
        self._own_root = root is None  # made here, so removed at close
        self.root = (root or Path("/tmp") / f"{PREFIX}{self.token}").resolve()
        self.size = size
        self.managers = size if managers is None else max(1, min(managers, size))
        self.driver = driver
        self.heartbeat = heartbeat
        self.tmpfs = tmpfs
        self.timeout = timeout
        self.progress = progress
        self.subnet: ipaddress.IPv4Network | None = None
        self.nodes: list[Node] = []
        self.timings: dict[str, float] = {}
        self.images: list[str] = []  # loaded on every node
        self._closed = False

    # -- life cycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> Cluster:
        """Build the network, start every engine and form the swarm."""
        if missing_tools():
            raise ClusterError(f"missing programs: {', '.join(missing_tools())}")
        cleanup_stale(self.progress)
        started = time.monotonic()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._register()
            self._storage()
            self._network()
            self._parallel(self._launch, self.nodes)
            self.timings["engines"] = time.monotonic() - started
            self._form_swarm()
        except BaseException:
            self.close()
            raise
        self.timings["cluster"] = time.monotonic() - started
        self.progress(
            f"swarm {self.token}: {self.size} nodes ({self.managers} managers, {self.driver}"
            f"{' on tmpfs' if self.tmpfs else ''}) on {self.subnet} "
            f"up in {self.timings['cluster']:.1f} s (engines {self.timings['engines']:.1f} s)"
        )
        return self

    def close(self) -> None:
        """Remove the services, leave the swarm, stop every engine, and remove everything the cluster made."""
        if self._closed:
            return
        self._closed = True
        started = time.monotonic()
        live = [n for n in self.nodes if n.running and n.client is not None]
        managers = [n for n in live if n.index <= self.managers]
        try:
            if managers:
                self._remove_services(managers[0])
            self._parallel(self._remove_containers, live)  # so that leaving stops no task gracefully
            self._parallel(self._leave, live)
            self._parallel(self._stop, self.nodes)
        except Exception as exc:  # what is left is killed and removed below
            self.progress(f"swarm {self.token}: stopping gracefully failed: {type(exc).__name__}: {exc}")
        finally:
            _teardown(self.token, self.root, [n.netns_id for n in self.nodes if n.netns_id], self.size)
        for node in self.nodes:
            if node.client is not None:
                node.client.close()
                node.client = None
        if self._own_root:
            with contextlib.suppress(OSError):
                self.root.rmdir()
        self.timings["close"] = time.monotonic() - started
        self.progress(f"swarm {self.token}: removed in {self.timings['close']:.1f} s")

    def leftovers(self) -> list[str]:
        """What of this cluster is still on the machine (see the module function)."""
        return leftovers(self.token, self.root, [n.netns_id for n in self.nodes if n.netns_id])

    # -- nodes ------------------------------------------------------------------------------------------------

    def node(self, index: int) -> Node:
        return self.nodes[index - 1]

    def client(self, index: int) -> DockerClient:
        """A docker-py client of node `index`'s engine."""
        client = self.node(index).client
        if client is None:
            raise ClusterError(f"node {index}'s engine is not running")
        return client

    @property
    def clients(self) -> list[DockerClient]:
        """A client per node, in node order (so clients[0] is node 1)."""
        return [self.client(n.index) for n in self.nodes]

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def kill_engine(self, index: int) -> None:
        """Kill node `index` as a power cut would: SIGKILL its dockerd, containerd, shims and containers at once.
        Its network namespace, data root and swarm membership stay (they are its disk and its cable)."""
        node = self.node(index)
        self.progress(f"swarm {self.token}: killing node {index}")
        self._kill_node(node)

    def start_engine(self, index: int) -> None:
        """Start node `index`'s engine again (after kill_engine); it rejoins the swarm by itself."""
        node = self.node(index)
        if node.running:
            raise ClusterError(f"node {index}'s engine is running")
        self._launch(node)

    def wait_ready(self, timeout: float | None = None, via: int | None = None) -> None:
        """Wait until every node is Ready (and every manager reachable) as a manager sees it."""
        def ready() -> bool:
            managers = [n for n in self.nodes if n.index <= self.managers and n.running]
            manager = self.node(via) if via else (managers[0] if managers else None)
            if manager is None or manager.client is None:
                return False
            try:
                nodes = manager.client.nodes.list()
            except docker.errors.APIError:
                return False
            return len(nodes) == self.size and all(  # a node that came back as a new member would show twice
                n.attrs["Status"]["State"] == "ready"
                and n.attrs.get("ManagerStatus", {"Reachability": "reachable"})["Reachability"] == "reachable"
                for n in nodes
            )

        _wait("every node to be Ready", ready, timeout or self.timeout, every=0.5)

    # -- images -----------------------------------------------------------------------------------------------

    def load_images(self, tags: Iterable[str], source: DockerClient | None = None) -> dict[str, float]:
        """Copy images from the host's engine (or `source`) to every node at once (deploy/images.py's save/load
        stream, no temporary file); returns seconds per node."""
        tags = list(tags)
        host = source or docker.from_env(timeout=600)
        started = time.monotonic()
        targets = {f"node{n.index}": self.client(n.index) for n in self.nodes}
        try:
            transfers = copy_images(host, targets, tags, progress=self.progress)
        finally:
            if source is None:
                host.close()
        failed = [f"{t.target}: {t.tag}: {t.error}" for t in transfers if not t.ok]
        if failed:
            raise ClusterError("image copy failed: " + "; ".join(failed))
        self.images += [tag for tag in tags if tag not in self.images]
        seconds = {name: sum(t.seconds for t in transfers if t.target == name) for name in targets}
        self.timings |= {f"load {name}": s for name, s in seconds.items()}
        self.timings["load"] = time.monotonic() - started
        self.progress(f"swarm {self.token}: {', '.join(tags)} on every node in {self.timings['load']:.1f} s")
        return seconds

    # -- inside -----------------------------------------------------------------------------------------------

    def _register(self) -> None:
        REGISTRY.mkdir(parents=True, exist_ok=True)
        used = self._used_subnets()
        free = [x for x in range(1, 254) if x not in used]
        if not free:
            raise ClusterError("no free 10.213.X.0/24 subnet")
        self.subnet = ipaddress.IPv4Network(SUBNET.format(random.choice(free)))
        record = {"owner": os.getpid(), "owner_start": _start_time(os.getpid()), "root": str(self.root),
                  "size": self.size, "subnet": str(self.subnet)}
        (REGISTRY / f"{self.token}.json").write_text(json.dumps(record))
        self.nodes = [Node(i, self.token, self.root, str(self.subnet[i])) for i in range(1, self.size + 1)]

    @staticmethod
    def _used_subnets() -> set[int]:
        used = set()
        routes = _run("ip", "-4", "-o", "addr", "show").stdout + _run("ip", "-4", "route", "show").stdout
        used |= {int(m.group(1)) for m in re.finditer(r"\b10\.213\.(\d+)\.", routes)}
        with contextlib.suppress(OSError):
            for path in REGISTRY.glob("*.json"):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    used.add(int(json.loads(path.read_text())["subnet"].split(".")[2]))
        return used

    def _network(self) -> None:
        """The switch namespace with its bridge, the host's veth (.254), and a namespace per node (.1, .2, …)."""
        assert self.subnet is not None
        switch, host_link = f"{PREFIX}{self.token}-sw", f"{PREFIX}{self.token}"
        bits = self.subnet.prefixlen
        _run("ip", "netns", "add", switch)
        _run("ip", "-n", switch, "link", "set", "lo", "up")
        _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", switch, "link", "set", "br0", "up")
        _run("ip", "link", "add", host_link, "type", "veth", "peer", "name", "uplink", "netns", switch)
        _run("ip", "-n", switch, "link", "set", "uplink", "master", "br0", "up")
        _run("ip", "addr", "add", f"{self.subnet[HOST_OCTET]}/{bits}", "dev", host_link)
        _run("ip", "link", "set", host_link, "up")
        for node in self.nodes:
            _run("ip", "netns", "add", node.name)
            _run("ip", "-n", node.name, "link", "set", "lo", "up")
            _run("ip", "-n", switch, "link", "add", f"p{node.index}", "type", "veth", "peer", "name", "eth0",
                 "netns", node.name)
            _run("ip", "-n", switch, "link", "set", f"p{node.index}", "master", "br0", "up")
            _run("ip", "-n", node.name, "addr", "add", f"{node.address}/{bits}", "dev", "eth0")
            _run("ip", "-n", node.name, "link", "set", "eth0", "up")
            node.netns_id = _netns_id(node.name)

    def _storage(self) -> None:
        """Each node's data root (a tmpfs if so decided) and the storage driver that works there."""
        if self.tmpfs is None:
            self.tmpfs = _available_memory() > TMPFS_HEADROOM + TMPFS_PER_NODE * self.size
        for node in self.nodes:
            data = node.state / "data"
            data.mkdir(parents=True, exist_ok=True)
            if self.tmpfs:
                _run("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0711", f"{node.name}-data", str(data))
        self.driver = self.driver or storage_driver(self.node(1).state / "data")

    def _launch(self, node: Node) -> None:
        """Start node's dockerd in its network namespace and a private mount namespace; wait until it answers."""
        for folder in (node.folder, node.state / "data", node.state / "etc"):
            folder.mkdir(parents=True, exist_ok=True)
        for point in (MOUNT_POINT, "/etc/docker", "/run/docker", "/run/containerd"):
            Path(point).mkdir(parents=True, exist_ok=True)  # empty mount points on the host
        config = node.state / "daemon.json"
        config.write_text(json.dumps({
            "storage-driver": self.driver, "iptables": True, "ip-forward": True, "live-restore": False,
            "log-driver": "json-file", "log-opts": {"max-size": "10m", "max-file": "2"}, "log-level": "info",
        }))
        with contextlib.suppress(FileNotFoundError):
            node.socket.unlink()  # a killed engine leaves its socket
        command = [
            "nsenter", f"--net={NETNS_DIR / node.name}", "unshare", "--mount", "--uts", "--propagation", "private",
            sys.executable, "-c", _SETUP, f"node{node.index}", str(node.folder), str(node.state / "etc"), str(self.root),
            "dockerd", "--config-file", str(config), "--data-root", str(node.state / "data"),
            "--exec-root", "/run/docker", "--pidfile", str(node.state / "dockerd.pid"),
            "--host", f"unix://{MOUNT_POINT}/docker.sock", "--cgroup-parent", f"/{node.name}",
        ]
        with open(node.log, "ab") as log:
            node.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

        def answers() -> bool:
            if not node.running:
                raise ClusterError(f"node {node.index}'s dockerd exited:\n{self.log_tail(node.index)}")
            if not node.socket.exists():
                return False
            try:
                client = DockerClient(base_url=node.url, timeout=300, version="1.41")
                client.ping()
            except Exception:
                return False
            node.client = client
            return True

        _wait(f"node {node.index}'s engine", answers, self.timeout)

    def _form_swarm(self) -> None:
        first = self.node(1)
        assert first.client is not None
        first.client.swarm.init(
            advertise_addr=first.address, listen_addr=f"{first.address}:{SWARM_PORT}",
            dispatcher_heartbeat_period=int(self.heartbeat * 1e9), task_history_retention_limit=2,
        )
        first.client.swarm.reload()
        tokens = first.client.swarm.attrs["JoinTokens"]
        for node in self.nodes[1:]:
            assert node.client is not None
            node.client.swarm.join(
                remote_addrs=[f"{first.address}:{SWARM_PORT}"],
                join_token=tokens["Manager" if node.index <= self.managers else "Worker"],
                listen_addr=f"{node.address}:{SWARM_PORT}", advertise_addr=node.address,
            )
        self.wait_ready()

    def _remove_services(self, node: Node) -> None:
        """Services (a stack's too), then their networks, configs and secrets."""
        client = node.client
        assert client is not None
        for service in client.services.list():
            service.remove()
        for network in client.networks.list(filters={"driver": "overlay"}):
            if network.name != "ingress":
                self._quietly(node, network.remove)
        for config in client.configs.list():
            self._quietly(node, config.remove)
        for secret in client.secrets.list():
            self._quietly(node, secret.remove)

    def _remove_containers(self, node: Node) -> None:
        """Force-remove every container of node's engine (SIGKILL: faster than dockerd stopping them)."""
        if node.client is None:
            return
        containers = self._quietly(node, partial(node.client.containers.list, all=True))
        for container in containers if isinstance(containers, list) else []:
            self._quietly(node, partial(container.remove, force=True))

    def _leave(self, node: Node) -> None:
        if node.client is not None:
            self._quietly(node, partial(node.client.swarm.leave, force=True))

    def _stop(self, node: Node) -> None:
        """Stop node's engine: its containers removed first, then SIGTERM, then anything left of the node killed."""
        if node.running:
            assert node.process is not None
            if node.client is not None:
                self._remove_containers(node)
            node.process.terminate()
            try:
                node.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.progress(f"node {node.index}'s dockerd ignored SIGTERM for 60 s; killing it")
        self._kill_node(node)

    def _kill_node(self, node: Node) -> None:
        """SIGKILL everything of one node: processes in its network namespace or cgroup, and those sharing their
        mount namespace."""
        nets = {node.netns_id} if node.netns_id else set()
        deadline = time.monotonic() + 60
        while True:
            pids = [p for p in _pids() if _ns(p, "net") in nets or _in_cgroup(p, [node.name])]
            mounts = {m for p in pids if (m := _ns(p, "mnt")) and m != _ns(os.getpid(), "mnt")}
            pids += [p for p in _pids() if p not in pids and _ns(p, "mnt") in mounts]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if node.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(timeout=0.5)
            if time.monotonic() > deadline:
                raise ClusterError(f"node {node.index}'s processes would not die: {pids}")
            time.sleep(0.1)
        if node.process is not None:
            node.process.wait()
        node.process = None
        if node.client is not None:
            node.client.close()
            node.client = None

    def _quietly(self, node: Node, action: Callable[[], object]) -> object:
        """Do `action` on node's engine; a failure is reported and ignored (for a cleanup that goes on)."""
        try:
            return action()
        except Exception as exc:
            self.progress(f"node {node.index}: {type(exc).__name__}: {exc}")
            return None

    @staticmethod
    def _parallel(action: Callable[[Node], object], nodes: Iterable[Node]) -> None:
        errors: list[BaseException] = []

        def run(node: Node) -> None:
            try:
                action(node)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def log_tail(self, index: int, lines: int = 30) -> str:
        """The end of node `index`'s dockerd log."""
        try:
            return "\n".join(self.node(index).log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
