"""No test reaches the network: both guards are active and refuse a connection off this machine.

In-process tests run under pytest-socket (pyproject's ``addopts``); subprocesses that the pipeline
tests start (DVC, papermill, kernels) load ``tests/netguard/sitecustomize.py``. Each test first
checks that the guard is installed, so a broken guard fails here instead of sending anything. The
address is TEST-NET-1 (192.0.2.0/24, reserved for documentation and never routed).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_socket

NETGUARD = Path(__file__).resolve().parent / "netguard"
OUTSIDE = ("192.0.2.1", 80)


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_pytest_socket_refuses_a_connection_off_this_machine():
    assert socket.socket.connect is not pytest_socket._true_connect, "pytest-socket is not active (see pyproject addopts)"
    with pytest.raises(pytest_socket.SocketConnectBlockedError):
        socket.create_connection(OUTSIDE, timeout=1)


def test_pytest_socket_keeps_loopback_open():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def netguard_env(log: Path) -> dict:
    """The environment that makes every Python subprocess load the netguard and log to ``log``."""
    path = os.pathsep.join(p for p in (str(NETGUARD), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PRELOGIT_NETGUARD": "1", "PRELOGIT_NETGUARD_LOG": str(log),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}


def test_netguard_refuses_off_machine_connections_in_subprocesses_and_logs_them(tmp_path):
    log = tmp_path / "net.log"
    code = f"""
import socket, _socket
assert socket.socket.connect is not _socket.socket.connect, "netguard not installed"
with socket.socket() as server:
    server.bind(("127.0.0.1", 0)); server.listen()
    socket.create_connection(server.getsockname(), timeout=5).close()   # loopback stays open
for attempt in (lambda: socket.create_connection({OUTSIDE!r}, timeout=1),
                lambda: socket.socket().connect_ex({OUTSIDE!r}),
                lambda: socket.getaddrinfo("example.org", 443)):
    try:
        attempt()
    except RuntimeError as err:
        print(err)
    else:
        raise SystemExit("not refused")
"""
    run = subprocess.run([sys.executable, "-c", code], env=netguard_env(log), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and all("refused" in line for line in lines), lines
