"""Passive nodes: API-only clients and standby GPUs, on one lightweight path.

A passive node (``[node] client = true`` / ``--client``, or ``[node] standby =
true``) never gossips and is in nobody's peer list.  It keeps ONE connection
(purpose ``"route"``) to one active node, asks it for the routing table
(``ROUTE_REQUEST`` -> ``ROUTE_TABLE``, ``meshd.serving.routetable``) every ``[mesh]
refresh_s`` and at once when a tunnel fails, and serves every model in the
table on its own API through tunnels (``meshd.serving.tunnel``) to the hosts, the
host chosen by the host-selection hook.  The active node also pushes the table
down that connection when it changes (a host died, a model appeared), which
is what lets a standby promote within a second of a host's death.

Which active node: standbys the lowest node id of the last table (so every
standby sees the same standby listing and the promotion tie-break agrees),
clients ``hash(node id) % n``; when it is unreachable (connection lost, no
answer within ``[mesh] connect_timeout_s``) the next one of the last table,
and only when every one failed the bootstrap tokens (``[mesh] join``), then the
standbys of the last table that said where they listen once promoted (when
every active node is gone, the one that promoted is where the mesh goes on) --
then again after a back-off (1 s doubling up to ``[mesh] rejoin_s``).

Identity: a client makes a fresh key and node id in memory at every start and
writes nothing (so it can sit beside a GPU node on the same machine, even with
the same state directory); it needs a token every start and holds the mesh
secret only in memory.  A standby uses the state directory like any node (it
may become active: its node id must be stable), saves the mesh secret it is
WELCOMEd with and the active nodes of its last table (``peers.json``), so once
promoted it rejoins the gossip with them.

Promotion (standby only): at every table it asks ``placement.should_promote``
with the table as the mesh view (active nodes, loading hosts counted as hosts,
every standby listed -- those of the last tables kept for 3 refreshes); the
default promotes when a model it has on disk and that fits has no host, with
a deterministic tie-break (VRAM, then node id) among the standbys.  Promotion
is the daemon's business (``on_promote``): stop this, start llama-server,
join the gossip.  When a full round of check-ins failed (every active node of
the last table and every token refused a dial since the last answer), it asks
the same hook with that table's active nodes taken as dead: the only host of a
model and the only active node may die together.

An active node that joined without a model and that assignment gives nothing
becomes a standby (:func:`stand_by`, the reverse of :func:`promote`): it
leaves the gossip and checks in here, with its identity and the mesh secret.

The active side is :class:`RouteServer`: it builds the table once per
membership change and answers every request with the same encoded bytes.
"""
