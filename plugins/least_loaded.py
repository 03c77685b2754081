"""least_loaded: send each request to the host with the fewest requests in flight.

The default spreads clients over a model's hosts by a hash of the client id,
which is even over many clients but blind to load: one busy client keeps
hammering its host while another idles.  This plugin looks at each host's
``load`` (requests in flight, as last reported) and picks the least loaded;
among equally loaded hosts it falls back to the default's stable hash, so a
quiet mesh still spreads clients evenly.  On a node that hosts the model
itself, this node is one of the candidates like any other (its ``load`` is
what it has in flight), so a busy local llama-server sends requests to an
idler peer.

Enable it in /etc/meshd.toml::

    [policy]
    plugins = ["least_loaded"]

No settings.  Only host selection changes; every other decision is the
default's.
"""

from __future__ import annotations

import pluggy

from meshd.placement.default import stable_index
from meshd.placement.snapshot import NodeView

hookimpl = pluggy.HookimplMarker("meshd")


@hookimpl
def meshd_select_host(model: str, client_id: str, hosts: tuple[NodeView, ...]) -> str:
    least = min(h.load for h in hosts)
    idle = [h for h in hosts if h.load == least]
    return idle[stable_index(client_id, model, len(idle))].node_id
