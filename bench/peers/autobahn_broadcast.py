"""A bare Autobahn broadcast chat: the baseline ``chatserver`` is measured against.

The same frames as chatserver for what the benchmarks use (join -> joined,
send -> ack + message to every member, per-room ids), and nothing else: no
storage, no Redis, no auth, no limits. Each broadcast is serialised once and
sent with Autobahn's prepared messages, the way its examples do it.

    python bench/peers/autobahn_broadcast.py PORT
"""

from __future__ import annotations

import json
import sys
import time

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


def dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Room:
    def __init__(self) -> None:
        self.members: set[BroadcastProtocol] = set()
        self.last_id = 0


ROOMS: dict[str, Room] = {}


class BroadcastProtocol(WebSocketServerProtocol):
    def onConnect(self, request):
        self.user = request.params.get("user", ["anonymous"])[0]
        self.joined: set[str] = set()

    def onMessage(self, payload, isBinary):
        msg = json.loads(payload)
        kind, ref, name = msg.get("type"), msg.get("ref"), msg.get("room")
        if kind == "join":
            room = ROOMS.setdefault(name, Room())
            room.members.add(self)
            self.joined.add(name)
            self.sendMessage(
                dumps({"type": "joined", "ref": ref, "room": name, "last_id": room.last_id})
            )
        elif kind == "send":
            room = ROOMS.get(name)
            if room is None or self not in room.members:
                self.sendMessage(dumps({"type": "error", "ref": ref, "code": "not_member"}))
                return
            room.last_id += 1
            ts = int(time.time() * 1000)
            self.sendMessage(
                dumps({"type": "ack", "ref": ref, "room": name, "id": room.last_id, "ts": ts})
            )
            frame = dumps(
                {
                    "type": "message",
                    "room": name,
                    "id": room.last_id,
                    "user": self.user,
                    "body": msg.get("body"),
                    "ts": ts,
                }
            )
            prepared = self.factory.prepareMessage(frame)
            for member in room.members:
                member.sendPreparedMessage(prepared)
        elif kind == "ping":
            self.sendMessage(dumps({"type": "pong", "ref": ref}))

    def onClose(self, wasClean, code, reason):
        for name in getattr(self, "joined", ()):
            ROOMS[name].members.discard(self)


def main() -> None:
    port = int(sys.argv[1])
    factory = WebSocketServerFactory(f"ws://127.0.0.1:{port}")
    factory.protocol = BroadcastProtocol
    factory.setProtocolOptions(perMessageCompressionAccept=lambda offers: None)
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=1024)
    print(f"autobahn broadcast peer: open http://localhost:{port}/", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
