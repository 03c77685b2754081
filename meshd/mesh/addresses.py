"""This host's addresses: what tokens and gossip tell others to dial.

Apart from the gossip because it is the one place meshd asks the kernel about
interfaces (an ``ioctl`` for IPv4, ``/proc/net/if_inet6`` for IPv6), and
because a token's issuer and the mesh service both need it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

from meshd.config import format_address, is_loopback, parse_address

SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


def host_addresses() -> list[str]:
    """Every address of this host's interfaces (IPv4 via ioctl, IPv6 from /proc), loopback last."""
    v4: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)
                v4.append(socket.inet_ntoa(res[20:24]))
            except OSError:
                continue
    v6: list[str] = []
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                raw = line.split()[0]
                addr = ipaddress.IPv6Address(int(raw, 16))
                if not addr.is_link_local:
                    v6.append(str(addr))
    except OSError:
        pass
    return sorted(set(v4), key=lambda a: (is_loopback(a), a)) + sorted(
        set(v6), key=lambda a: (is_loopback(a), a))


def advertise_addresses(configured: list[str], listen_host: str, port: int) -> list[str]:
    """What tokens and gossip carry: ``[mesh] advertise`` (``:0`` or no port = the
    listening port), else every usable address we listen on, loopback last."""
    if configured:
        out = []
        for text in configured:
            host, p = parse_address(text, default_port=0)
            out.append(format_address(host, p or port))
        return out
    if listen_host in ("0.0.0.0", "::", ""):
        addrs = host_addresses()
        if listen_host != "::":
            addrs = [a for a in addrs if ":" not in a]
    else:
        addrs = [listen_host]
    return [format_address(a, port) for a in addrs]
