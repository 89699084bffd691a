"""Versioned schema migrations, in SQL both SQLite and Postgres accept.

A migration is applied once, in order, inside one transaction with the bump of
``schema_version``. A server refuses to run against a schema newer than it knows.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "rooms with a per-room id counter, messages keyed by (room, id)",
        [
            # last_id is the counter that hands out gap-free ids: the row lock on it
            # serialises writers of one room, so ids follow commit order.
            "CREATE TABLE rooms (name TEXT PRIMARY KEY, last_id BIGINT NOT NULL DEFAULT 0)",
            "CREATE TABLE messages ("
            " room TEXT NOT NULL, id BIGINT NOT NULL, username TEXT NOT NULL,"
            " body TEXT NOT NULL, ts BIGINT NOT NULL, PRIMARY KEY (room, id))",
        ],
    ),
    (
        2,
        "private rooms, their members, bans (room '' = everywhere)",
        [
            "ALTER TABLE rooms ADD COLUMN private BOOLEAN NOT NULL DEFAULT FALSE",
            "CREATE TABLE room_members ("
            " room TEXT NOT NULL, username TEXT NOT NULL, PRIMARY KEY (room, username))",
            "CREATE TABLE bans ("
            " room TEXT NOT NULL, username TEXT NOT NULL, PRIMARY KEY (room, username))",
        ],
    ),
    (
        3,
        "removals from rooms, which outrank a token's rooms claim until the user is added again",
        [
            # A table of its own, not a flag on room_members: an instance still on the
            # previous version during a rolling upgrade reads room_members as before.
            "CREATE TABLE room_removals ("
            " room TEXT NOT NULL, username TEXT NOT NULL, PRIMARY KEY (room, username))",
        ],
    ),
    (
        4,
        "the client's id of a send (cid), unique per room and user: a retried send is stored once",
        [
            "ALTER TABLE messages ADD COLUMN cid TEXT",
            "CREATE UNIQUE INDEX messages_cid ON messages (room, username, cid)"
            " WHERE cid IS NOT NULL",
        ],
    ),
    (
        5,
        "edits and deletes: events in the room's sequence, and the folded state of their target",
        [
            # On an event row: the id of the message it edits or deletes.
            "ALTER TABLE messages ADD COLUMN edits BIGINT",
            "ALTER TABLE messages ADD COLUMN deletes BIGINT",
            # On a message: the ts of its last edit; deleted (its text is erased).
            "ALTER TABLE messages ADD COLUMN edited BIGINT",
            "ALTER TABLE messages ADD COLUMN deleted BOOLEAN NOT NULL DEFAULT FALSE",
            # A delete erases the texts of the target's edits: found by this index.
            "CREATE INDEX messages_edits ON messages (room, edits) WHERE edits IS NOT NULL",
        ],
    ),
    (
        6,
        "read markers: how far each user has read each room",
        [
            "CREATE TABLE read_markers ("
            " room TEXT NOT NULL, username TEXT NOT NULL, id BIGINT NOT NULL,"
            " PRIMARY KEY (room, username))",
        ],
    ),
]

LATEST = MIGRATIONS[-1][0]
