"""chatserver-client: a terminal chat client that survives server restarts.

The parts, from the pure logic out to the terminal:

- ``session``: the sans-IO session (resume after a reconnect, de-duplication by
  (room, id), ordering of live messages around a catch-up, reconnect backoff,
  pacing, read markers, typing lines, who is online), with ``events`` (frames
  and events) and ``outbox`` (pending sends);
- ``connection``: the WebSocket to the server (Autobahn on Twisted), paced;
- ``terminal``: the command-line front end and ``main``.

Importing the package imports none of them, so that ``chatserver.client.session``
loads without Twisted or Autobahn; ``main`` loads the front end when called.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The ``chatserver-client`` entry point (``chatserver.client:main``)."""
    from chatserver.client.terminal import main as run

    return run(argv)
