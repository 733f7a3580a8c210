"""Block network connections in this Python process (and so in a Jupyter kernel started with it).

Put this folder on PYTHONPATH: Python imports ``sitecustomize`` at start-up. Loopback and Unix sockets stay
open (Jupyter talks to its kernels over loopback); any other address raises ``OSError`` at once, so tiny
mode proves it downloads nothing.
"""
import ipaddress
import socket

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


class NetworkBlocked(OSError):
    pass


def _allowed(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost",)


def _guard(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _allowed(address):
        raise NetworkBlocked(f"network access blocked in the offline test run: connect to {address!r}")


def connect(self, address):
    _guard(self, address)
    return _real_connect(self, address)


def connect_ex(self, address):
    _guard(self, address)
    return _real_connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost", "127.0.0.1", "::1", "") and not str(host).startswith("127."):
        raise NetworkBlocked(f"network access blocked in the offline test run: name lookup of {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.getaddrinfo = getaddrinfo
