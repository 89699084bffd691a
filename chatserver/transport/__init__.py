"""The WebSocket transport: Autobahn's protocol and factory, adapted to the chat core.

- ``policies``: which origins may connect, which address a connection counts as;
- ``protocol``: one connection (handshake, frames in, ``write``/``close`` out);
- ``outbound``: its bounded send queue and the slow-client drop;
- ``fast``: the protocol class built from the fast paths that are on;
- ``factory``: Autobahn's options, the shared ping timer, the drain.
"""

CLOSE_GOING_AWAY = 1001
