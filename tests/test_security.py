"""Every security default, proven from inside the sandbox."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from testcontainers.core.container import DockerContainer

from workbench import Session, Workbench
from workbench.config import BASE_IMAGE


def run(session: Session, code: str) -> str:
    result = session.execute(code)
    assert result.error is None, str(result.error)
    return result.stdout.strip()


def test_runs_as_a_non_root_user(session: Session) -> None:
    assert run(session, "import os\nprint(os.getuid(), os.getgid(), os.geteuid())") != "0 0 0"
    assert run(session, "import os\nprint(os.geteuid())") != "0"


def test_no_capabilities_and_no_new_privileges(session: Session) -> None:
    status = run(session, "print(open('/proc/self/status').read())")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name], 16) == 0, f"{name} = {fields[name]}"
    assert fields["NoNewPrivs"].strip() == "1"


def test_seccomp_is_reported_and_on_when_the_engine_says_so(wb: Workbench, session: Session) -> None:
    status = run(session, "print(open('/proc/self/status').read())")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    engine_has_seccomp = any(option.startswith("name=seccomp") for option in wb.engine_security)
    assert (fields["Seccomp"].strip() == "2") == engine_has_seccomp  # 2: a filter is applied


def test_no_network(session: Session) -> None:
    assert run(session, "import os\nprint(sorted(os.listdir('/sys/class/net')))") == "['lo']"
    out = run(
        session,
        "import socket\n"
        "for addr in [('1.1.1.1', 53), ('8.8.8.8', 443), ('172.17.0.1', 2375)]:\n"
        "    try:\n"
        "        socket.create_connection(addr, timeout=2).close()\n"
        "        print('connected', addr)\n"
        "    except OSError as exc:\n"
        "        print('refused', exc.errno)",
    )
    assert "connected" not in out
    assert out.count("refused") == 3


@pytest.fixture(scope="module")
def neighbour() -> Iterator[str]:
    """Another container on Docker's bridge network, listening on TCP: the sandbox must not reach it."""
    server = (
        DockerContainer(BASE_IMAGE)
        .with_command(["python3", "-m", "http.server", "8000"])
    )
    with server:
        server.get_wrapped_container().reload()
        ip = server.get_wrapped_container().attrs["NetworkSettings"]["IPAddress"]
        assert ip
        yield ip


def test_cannot_reach_another_container(session: Session, neighbour: str) -> None:
    out = run(
        session,
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('{neighbour}', 8000), timeout=2).close(); print('connected')\n"
        "except OSError as exc:\n"
        "    print('unreachable', type(exc).__name__)",
    )
    assert out.startswith("unreachable")


def test_root_filesystem_is_read_only(session: Session) -> None:
    out = run(
        session,
        "import errno\n"
        "for path in ['/etc/evil', '/usr/bin/evil', '/opt/workbench/evil']:\n"
        "    try:\n"
        "        open(path, 'w').write('x'); print('wrote', path)\n"
        "    except OSError as exc:\n"
        "        print(errno.errorcode[exc.errno])\n"
        "root = [l.split() for l in open('/proc/mounts') if l.split()[1] == '/'][0]\n"
        "print('root-options', root[3])",
    )
    assert "wrote" not in out
    assert "ro" in out.split("root-options ")[1].split(",")
    assert run(session, "open('/tmp/scratch', 'w').write('ok'); print(open('/tmp/scratch').read())") == "ok"
    assert run(session, "open('/workspace/data.txt', 'w').write('ok'); print(open('data.txt').read())") == "ok"


def test_only_workspace_and_runtime_dir_are_mounted(session: Session) -> None:
    out = run(
        session,
        "import os\n"
        "mounts = [l.split()[4] + ' ' + l.split()[5].split(',')[0] for l in open('/proc/self/mountinfo')]\n"
        "print('\\n'.join(mounts))\n"
        "print('docker-socket', any(os.path.exists(p) for p in "
        "['/var/run/docker.sock', '/run/docker.sock', '/docker.sock']))",
    )
    lines = out.splitlines()
    assert lines[-1] == "docker-socket False"
    mounts = dict(line.split() for line in lines[:-1] if not line.startswith(("/proc", "/sys", "/dev")))
    # Docker's own per-container files and its init come along with every container.
    docker_files = {"/etc/resolv.conf", "/etc/hostname", "/etc/hosts", "/sbin/docker-init", "/usr/sbin/docker-init"}
    mine = {path: mode for path, mode in mounts.items() if path not in docker_files}
    # the image's Python trees come from read-only copies on the host (faster imports than the storage driver)
    assert mine == {"/": "ro", "/tmp": "rw", "/workspace": "rw", "/run/workbench": "rw",
                    "/usr/lib/python3.11": "ro", "/usr/local/lib/python3.11": "ro"}


def test_fork_bomb_is_stopped_by_the_pids_limit(fresh: Session) -> None:
    result = fresh.execute(
        "import os, time\n"
        "children, error = [], None\n"
        "try:\n"
        "    for _ in range(5000):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(3)\n"
        "            os._exit(0)\n"
        "        children.append(pid)\n"
        "except OSError as exc:\n"
        "    error = exc\n"
        "for pid in children:\n"
        "    os.waitpid(pid, 0)\n"
        "print(len(children), type(error).__name__)",
        timeout=60,
    )
    assert result.error is None, str(result.error)
    count, error = result.stdout.split()
    assert error == "BlockingIOError"  # EAGAIN from fork: the limit, not the loop's end
    assert int(count) < fresh.limits.pids
    assert fresh.execute("1 + 1").text == "2"


def test_memory_limit_kills_only_the_kernel(wb: Workbench) -> None:
    with wb.create(user_id="test-user", limits={"memory": "256m"}) as small, \
            wb.create(user_id="test-user") as neighbour:
        neighbour.execute("alive = 'yes'")
        small.execute("before = 1")
        result = small.execute("hog = b'x' * (600 * 2**20)", timeout=60)
        assert result.kernel_died is not None and result.kernel_died.startswith("OOM-killed"), result.kernel_died
        assert result.state_lost
        assert small.execute("2 * 21").text == "42"
        assert neighbour.execute("alive").text == "'yes'"


def test_limits_are_applied_to_the_container(fresh: Session) -> None:
    out = run(
        fresh,
        "from pathlib import Path\n"
        "def first(*paths):\n"
        "    return next(Path(p).read_text().split()[0] for p in paths if Path(p).exists())\n"
        "print(first('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'))\n"
        "print(first('/sys/fs/cgroup/pids.max', '/sys/fs/cgroup/pids/pids.max'))",
    )
    memory, pids = out.split()
    assert int(memory) == fresh.limits.memory
    assert int(pids) == fresh.limits.pids


def test_containers_are_labelled(wb: Workbench, session: Session) -> None:
    containers = wb.docker.containers.list(filters={"label": f"workbench.session={session.session_id}"})
    assert len(containers) == 1
    labels = containers[0].labels
    assert labels["workbench.managed"] == "true"
    # a kernel started for the session names its user; a warm-pool kernel's user is the store's
    assert labels.get("workbench.user", wb.store.get(labels["workbench.session"]).user_id) == "test-user"
    assert ("workbench.user" in labels) != ("workbench.pool" in labels)
    assert labels["workbench.home"] == wb.home_label
    host = containers[0].attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"]
