"""Copied as `sitecustomize.py` into a directory on PYTHONPATH by test_no_network.py, so that every
Python process of the run (and its children) imports it at startup: each attempt to reach
another machine, or to listen where another machine could connect (binding a non-loopback or
the wildcard address), is appended to $NO_NETWORK_LOG as a JSON line and fails (ENETUNREACH,
EADDRNOTAVAIL), as it would on a machine without a network. Unix sockets and loopback stay open
(multiprocessing, wandb's local service, a process group on one host). Sockets opened by C++
(gloo, TCPStore) are not seen here: test_no_network.py lists the run's listening sockets itself."""

import errno
import ipaddress
import json
import os
import socket
import traceback

_LOG = os.environ["NO_NETWORK_LOG"]


def _is_local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in (None, "", "localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return False  # any other name: resolving it may ask a DNS server
    return address.is_loopback or address.is_unspecified  # unspecified: binding to all interfaces


def _is_loopback(host) -> bool:
    """Strictly loopback: a socket bound here cannot be reached from another machine."""
    if isinstance(host, bytes):
        host = host.decode()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(call: str, target: object, code: int = errno.ENETUNREACH) -> None:
    with open(_LOG, "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "call": call, "target": repr(target),
                              "stack": traceback.format_stack()[:-2]}) + "\n")
    raise OSError(code, f"network blocked by the test: {call}({target!r})")


def _guard_address(name: str, address_arg: int) -> None:
    """Wrap socket.socket.<name>, whose argument `address_arg` (from the end) is an address."""
    original = getattr(socket.socket, name)

    def guarded(self, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(args[address_arg][0]):
            _refuse(name, args[address_arg])
        return original(self, *args)

    setattr(socket.socket, name, guarded)


def _guard_host(module, name: str) -> None:
    """Wrap module.<name>, whose first argument is a host name or an (host, port) address."""
    original = getattr(module, name)

    def guarded(host, *args, **kwargs):
        if not _is_local(host[0] if isinstance(host, tuple) else host):
            _refuse(name, host)
        return original(host, *args, **kwargs)

    setattr(module, name, guarded)


def _guard_listening() -> None:
    """bind() to anything but loopback, and listen() on such a socket, are refused."""
    original_bind, original_listen = socket.socket.bind, socket.socket.listen

    def bind(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            _refuse("bind", address, errno.EADDRNOTAVAIL)
        return original_bind(self, address)

    def listen(self, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(self.getsockname()[0]):
            _refuse("listen", self.getsockname(), errno.EADDRNOTAVAIL)
        return original_listen(self, *args)

    socket.socket.bind, socket.socket.listen = bind, listen


_guard_listening()
_guard_address("connect", 0)
_guard_address("connect_ex", 0)
_guard_address("sendto", -1)  # sendto(data, address) or sendto(data, flags, address)
for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
    _guard_host(socket, _name)
