"""Refuse every network connection that leaves this machine, in any Python process started with
this folder on ``PYTHONPATH`` and ``PRELOGIT_NETGUARD=1`` (tests/test_pipeline.py runs DVC so, and
DVC's children, papermill and the notebook kernels, inherit it).

Loopback (127.0.0.0/8, ::1, localhost) and unix sockets stay allowed: papermill talks to its
kernel over ZMQ on loopback. A refused attempt raises ``RuntimeError`` and is appended to the file
named by ``PRELOGIT_NETGUARD_LOG`` (if set), so a test sees it even when a library swallows it.
Each guarded process appends its command line to ``PRELOGIT_NETGUARD_SEEN`` (if set), so a test
can check that the guard reached every process (DVC, the stage wrapper, the kernel).
"""

import os

if os.environ.get("PRELOGIT_NETGUARD") == "1":
    import ipaddress
    import socket

    _LOG = os.environ.get("PRELOGIT_NETGUARD_LOG")
    _connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
    _create_connection, _getaddrinfo = socket.create_connection, socket.getaddrinfo

    def _local(host) -> bool:
        if host is None or host in ("", "localhost", "localhost.localdomain"):
            return True
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def _refuse(what: str, address) -> None:
        message = f"prelogit netguard: {what} to {address!r} refused in pid {os.getpid()} (tests forbid the network)"
        if _LOG:
            with open(_LOG, "a") as f:
                f.write(message + "\n")
        raise RuntimeError(message)

    def _check(sock, address, what: str) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(what, address)

    def connect(self, address):
        _check(self, address, "connect")
        return _connect(self, address)

    def connect_ex(self, address):
        _check(self, address, "connect_ex")
        return _connect_ex(self, address)

    def create_connection(address, *args, **kwargs):
        if not _local(address[0]):
            _refuse("create_connection", address)
        return _create_connection(address, *args, **kwargs)

    def getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            _refuse("getaddrinfo", host)
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.create_connection, socket.getaddrinfo = create_connection, getaddrinfo

    if os.environ.get("PRELOGIT_NETGUARD_SEEN"):
        try:
            with open("/proc/self/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmdline = "?"
        with open(os.environ["PRELOGIT_NETGUARD_SEEN"], "a") as f:
            f.write(f"{os.getpid()} {cmdline}\n")
