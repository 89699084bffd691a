"""A minimal Django Channels chat: the setup chatserver is built to replace.

daphne serves an ``AsyncJsonWebsocketConsumer``; fan-out goes through
channels_redis groups (the default RedisChannelLayer, default capacity);
messages are stored in PostgreSQL through the Django ORM's connection in
``database_sync_to_async`` threads, with a per-room counter for ids. It speaks
the frames the benchmarks use (join -> joined, send -> ack + message to every
member of the room, ping -> pong), in the same tables chatserver migrates.

    bench/peers/channels/.venv/bin/python bench/peers/channels/run.py PORT REDIS_URL DATABASE_URL
"""

from __future__ import annotations

import json
import sys
import time
from urllib.parse import parse_qs, urlsplit

import django
from django.conf import settings

PORT, REDIS_URL, DATABASE_URL = int(sys.argv[1]), sys.argv[2], sys.argv[3]
_db = urlsplit(DATABASE_URL)

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    INSTALLED_APPS=["channels"],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": _db.path.lstrip("/"),
            "USER": _db.username or "",
            "PASSWORD": _db.password or "",
            "HOST": _db.hostname or "",
            "PORT": str(_db.port or ""),
            "CONN_MAX_AGE": 60,  # a common production setting
        }
    },
    CHANNEL_LAYERS={
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # The default pool refuses a burst of joins with "Too many connections"
            # (redis-py's pool limit); raised so that the benchmark can run at all.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "max_connections": 4096}]},
        }
    },
    ASGI_APPLICATION="run.application",
    USE_TZ=True,
)
django.setup()

from channels.db import database_sync_to_async  # noqa: E402
from channels.generic.websocket import AsyncJsonWebsocketConsumer  # noqa: E402
from channels.routing import URLRouter  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.urls import path  # noqa: E402


def group(room: str) -> str:
    return "room." + "".join(c if c.isalnum() or c in "-_." else "_" for c in room)[:90]


@database_sync_to_async
def last_id(room: str) -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT last_id FROM rooms WHERE name = %s", [room])
        row = cur.fetchone()
    return row[0] if row else 0


@database_sync_to_async
def store(room: str, user: str, body: str, ts: int) -> int:
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(
            "INSERT INTO rooms (name, last_id) VALUES (%s, 1) ON CONFLICT (name)"
            " DO UPDATE SET last_id = rooms.last_id + 1 RETURNING last_id",
            [room],
        )
        mid = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO messages (room, id, username, body, ts) VALUES (%s, %s, %s, %s, %s)",
            [room, mid, user, body, ts],
        )
    return mid


class ChatConsumer(AsyncJsonWebsocketConsumer):
    @classmethod
    async def encode_json(cls, content: dict) -> str:
        # Compact, like chatserver's frames (the generator matches on them).
        return json.dumps(content, separators=(",", ":"), ensure_ascii=False)

    async def connect(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode())
        self.user = query.get("user", ["anonymous"])[0]
        self.joined: set[str] = set()
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for room in self.joined:
            await self.channel_layer.group_discard(group(room), self.channel_name)

    async def receive_json(self, content: dict, **kwargs) -> None:
        kind, ref, room = content.get("type"), content.get("ref"), content.get("room")
        if kind == "join":
            await self.channel_layer.group_add(group(room), self.channel_name)
            self.joined.add(room)
            await self.send_json(
                {"type": "joined", "ref": ref, "room": room, "last_id": await last_id(room)}
            )
        elif kind == "send":
            ts = int(time.time() * 1000)
            mid = await store(room, self.user, content.get("body", ""), ts)
            await self.send_json({"type": "ack", "ref": ref, "room": room, "id": mid, "ts": ts})
            message = {"room": room, "id": mid, "user": self.user, "body": content.get("body")}
            await self.channel_layer.group_send(
                group(room), {"type": "chat.message", "message": {**message, "ts": ts}}
            )
        elif kind == "ping":
            await self.send_json({"type": "pong", "ref": ref})

    async def chat_message(self, event: dict) -> None:
        await self.send_json({"type": "message", **event["message"]})


application = URLRouter([path("ws", ChatConsumer.as_asgi())])


def main() -> None:
    from daphne.endpoints import build_endpoint_description_strings
    from daphne.server import Server

    Server(
        application=application,
        endpoints=build_endpoint_description_strings(host="127.0.0.1", port=PORT),
        ready_callable=lambda: print(f"channels peer: open http://localhost:{PORT}/", flush=True),
        verbosity=0,
    ).run()


if __name__ == "__main__":
    main()
