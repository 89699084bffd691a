"""Fuzzing the wire format: property tests of ``wire.parse``, and garbage at a live server.

The parser is pure, so hypothesis drives it directly. The live test cannot run
hypothesis inside the reactor, so it sends frames from a seeded generator that
covers the same ground (bytes, text, truncated and deeply nested JSON, huge
numbers, NaN, escapes of NUL and lone surrogates, every field of every type
with a wrong value, unknown types, binary frames) and uses ``wire.parse``
itself as the oracle for what each answer must be.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from wsclient import TIMEOUT, Client, connect

from chatserver import wire

ensure = pytest_twisted.ensureDeferred

PROTOCOL_CODES = set(wire.ERROR_CODES)
PARSE_CODES = {wire.BAD_FRAME, wire.BAD_REQUEST, wire.TOO_LARGE}
KINDS = ["join", "leave", "send", "history", "ping"]
REPLY = {"join": "joined", "leave": "left", "send": "ack", "history": "history", "ping": "pong"}
FRAME_CLASS = {
    "join": wire.Join,
    "leave": wire.Leave,
    "send": wire.Send,
    "history": wire.History,
    "ping": wire.Ping,
}


# -- checking one parse ------------------------------------------------------------


def valid_ref(ref: object) -> bool:
    if isinstance(ref, bool):
        return False
    if isinstance(ref, int):
        return True
    return isinstance(ref, str) and "\x00" not in ref and _utf8(ref)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_parse(
    payload: bytes, is_binary: bool, max_body: int, source: dict | None = None
) -> wire.ClientFrame | None:
    """Parse and check every rule; ``source`` is the object ``payload`` encodes, if known.

    Anything but ``FrameError`` escaping ``parse`` fails the calling test.
    """
    if source is not None:
        # What the payload means, not the object it was made from: JSON joins an
        # escaped surrogate pair ("\ud800\udc00") into one character (U+10000).
        source = json.loads(payload)
    try:
        frame = wire.parse(payload, is_binary, max_body)
    except wire.FrameError as e:
        assert e.code in PARSE_CODES, e.code
        assert isinstance(e.message, str) and e.message and "Traceback" not in e.message
        assert e.ref is None or valid_ref(e.ref), e.ref
        # The answer can always be encoded, as strict JSON in valid UTF-8.
        answer = json.loads(wire.error(e.code, e.message, e.ref).decode("utf-8"))
        assert answer["code"] == e.code and answer.get("ref") == e.ref
        if source is not None and e.ref is not None:
            assert e.ref == source.get("ref")
        if is_binary:
            assert e.code == wire.BAD_FRAME
        return None

    assert not is_binary
    assert isinstance(frame, wire.Join | wire.Leave | wire.Send | wire.History | wire.Ping)
    assert frame.ref is None or valid_ref(frame.ref), frame.ref
    if not isinstance(frame, wire.Ping):
        assert wire.is_valid_name(frame.room) and isinstance(frame.room, str), frame.room
    if isinstance(frame, wire.Send):
        body = frame.body
        assert isinstance(body, str) and 1 <= len(body) <= max_body
        assert "\x00" not in body and _utf8(body)
    if isinstance(frame, wire.History):
        for cursor in (frame.before, frame.after):
            assert cursor is None or (
                isinstance(cursor, int)
                and not isinstance(cursor, bool)
                and 0 <= cursor <= wire.MAX_ID
            ), cursor
        assert frame.before is None or frame.after is None
        assert isinstance(frame.limit, int) and not isinstance(frame.limit, bool)
        assert 1 <= frame.limit <= wire.HISTORY_LIMIT_MAX
    # Every reply to it can be encoded.
    json.loads(wire.reply("pong", frame.ref))
    if source is not None:
        assert isinstance(frame, FRAME_CLASS[source["type"]]), (frame, source)
        assert frame.ref == source.get("ref")
        for name in ("room", "body", "before", "after", "limit"):
            if name in source and hasattr(frame, name):
                assert getattr(frame, name) == source[name], name
    return frame


# -- hypothesis strategies ----------------------------------------------------------

# All of Unicode, lone surrogates included (json.dumps escapes them as \udXXX).
any_char = st.characters(exclude_categories=())
# What a valid body or ref may hold: no NUL, no lone surrogate.
clean_char = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
any_text = st.text(any_char, max_size=12)
huge_ints = st.integers(min_value=-(10**40), max_value=10**40)


def json_values(allow_nan: bool) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | huge_ints
        | st.floats(allow_nan=allow_nan, allow_infinity=allow_nan)
        | any_text
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
        ),
        max_leaves=20,
    )


@st.composite
def encoded(draw: Any, values: st.SearchStrategy[Any] | None = None) -> tuple[bytes, Any]:
    """(UTF-8 JSON bytes, the value); NaN/Infinity only when the draw allows them."""
    allow_nan = draw(st.booleans())
    value = draw(values if values is not None else json_values(allow_nan))
    ensure_ascii = draw(st.booleans())
    text = json.dumps(value, allow_nan=True, ensure_ascii=ensure_ascii)
    # Lone surrogates can't be UTF-8: they go over the wire as \\udXXX escapes, or
    # (surrogatepass) as the CESU bytes a WebSocket peer would refuse with 1007.
    how = draw(st.sampled_from(["strict", "surrogatepass"]))
    try:
        data = text.encode("utf-8", how)
    except UnicodeEncodeError:
        data = json.dumps(value, allow_nan=True).encode()
    return data, value


room_values = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True),
    st.sampled_from(["lobby", "a", "x" * 64, "x" * 65, "", " ", "has space", "café", "a/b"]),
    any_text,
    st.text(st.sampled_from("ab:.-_ \x00\n"), max_size=66),
)
body_values = st.one_of(
    st.text(any_char, min_size=0, max_size=25),
    st.text(st.sampled_from("ab\x00é\U0001f600\ud800\udfff"), max_size=25),
    st.sampled_from(["", " ", "\x00", "\ud800", "\ud83d\ude00"]),
)
int_values = st.one_of(
    st.integers(min_value=-2, max_value=102),
    st.sampled_from([wire.MAX_ID, wire.MAX_ID + 1, -(2**63), 2**64, 10**30]),
    huge_ints,
)
ref_values = st.one_of(any_text, st.integers(), huge_ints, st.sampled_from([0, -1, 2**53, ""]))
wrong_values = json_values(allow_nan=True)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, wrong_values, st.sampled_from([None, True, False, 1.5, [], {}]))


frame_dicts = st.fixed_dictionaries(
    {"type": st.sampled_from([*KINDS, "unknown"]) | field(st.sampled_from(KINDS))},
    optional={
        "room": field(room_values),
        "body": field(body_values),
        "before": field(int_values),
        "after": field(int_values),
        "limit": field(int_values),
        "ref": field(ref_values),
        "extra": wrong_values,
    },
)

FUZZ = settings(max_examples=1500, deadline=None)


@FUZZ
@given(payload=st.binary(max_size=300), is_binary=st.booleans(), max_body=st.integers(1, 50))
def test_parse_arbitrary_bytes(payload, is_binary, max_body):
    check_parse(payload, is_binary, max_body)


@FUZZ
@given(data=encoded(), max_body=st.integers(1, 50))
def test_parse_arbitrary_json(data, max_body):
    payload, _ = data
    check_parse(payload, False, max_body)


@FUZZ
@given(data=encoded(frame_dicts), max_body=st.integers(1, 30), is_binary=st.booleans())
def test_parse_frame_like_objects(data, max_body, is_binary):
    payload, obj = data
    check_parse(payload, is_binary, max_body, source=obj)


@FUZZ
@given(
    data=st.one_of(
        encoded(json_values(allow_nan=True)), encoded(frame_dicts.map(lambda d: {"x": d}))
    ),
    cut=st.integers(min_value=0, max_value=400),
)
def test_parse_truncated_json(data, cut):
    payload, _ = data
    check_parse(payload[:cut], False, 10)


@FUZZ
@given(depth=st.integers(1, 3000), kind=st.sampled_from("[{"), where=st.sampled_from(KINDS))
def test_parse_deep_nesting(depth, kind, where):
    nested = "[" * depth + "]" * depth if kind == "[" else '{"a":' * depth + "1" + "}" * depth
    for payload in (nested, f'{{"type":"{where}","room":"r","x":{nested}}}'):
        frame = check_parse(payload.encode(), False, 10)
        # Counting the frame object itself, at most MAX_DEPTH levels are accepted.
        if payload.startswith('{"type"') and depth + 1 > wire.MAX_DEPTH:
            assert frame is None


valid_frames = st.one_of(
    st.builds(
        lambda kind, room, ref: {"type": kind, "room": room, "ref": ref},
        st.sampled_from(["join", "leave"]),
        st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True),
        st.none() | st.integers() | st.text(clean_char),
    ),
    st.builds(
        lambda room, body: {"type": "send", "room": room, "body": body},
        st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True),
        st.text(clean_char, min_size=1, max_size=30),
    ),
    st.builds(
        lambda room, cursor, which, limit: (
            {"type": "history", "room": room, which: cursor}
            | ({} if limit is None else {"limit": limit})
        ),
        st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True),
        st.integers(0, wire.MAX_ID),
        st.sampled_from(["before", "after"]),
        st.none() | st.integers(1, wire.HISTORY_LIMIT_MAX),
    ),
    st.builds(
        lambda ref: {"type": "ping", "ref": ref},
        st.integers() | st.text(clean_char),
    ),
)


@FUZZ
@given(frame=valid_frames, ensure_ascii=st.booleans())
def test_parse_accepts_every_valid_frame(frame, ensure_ascii):
    frame = {k: v for k, v in frame.items() if v is not None}
    payload = json.dumps(frame, ensure_ascii=ensure_ascii).encode()
    parsed = check_parse(payload, False, 30, source=frame)
    assert parsed is not None, frame


# -- a live server -------------------------------------------------------------------

MAX_FUZZ_BYTES = 60_000  # under max_frame_bytes (65536): bigger closes with 1009
WEIRD = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -0.0,
    2**63,
    wire.MAX_ID,
    10**30,
    "",
    " ",
    "x",
    "\x00",
    "\ud800",
    "\udfff\ud800",
    "é",
    "\U0001f600",
    [],
    [1, [2]],
    {},
    {"a": None},
    "ping",
    "x" * 65,
]
ROOMS = ["fz", "fz-2", "a:b", "x.y_z", "R" * 64]
ALPHABETS = [
    'abcxyz{}[]":,0123456789 ',
    "éüß€\u2028\u2029\ufeff",
    "日本語中文",
    "\U0001f600\U0001f4a9",
    "".join(map(chr, range(32))),
    "\\\"'/",
]


class FrameGenerator:
    """Seeded fuzz frames: (payload, is_binary). All valid UTF-8 when sent as text."""

    def __init__(self, seed: int, rooms: list[str]) -> None:
        self.rng = random.Random(seed)
        self.rooms = rooms  # rooms the fuzz connection may use
        self.n = 0

    def text(self, size: int) -> str:
        rng = self.rng
        alphabet = rng.choice(ALPHABETS)
        return "".join(rng.choice(alphabet) for _ in range(size))

    def ref(self) -> Any:
        rng = self.rng
        self.n += 1
        r = rng.random()
        if r < 0.6:
            return f"fz{self.n}"
        if r < 0.8:
            return self.n
        if r < 0.9:
            return rng.choice(WEIRD)
        return rng.choice([int("9" * 4000), -(2**80), "\u00e9" * 50, "\U0001f600"])

    def room(self) -> Any:
        rng = self.rng
        r = rng.random()
        if r < 0.7:
            return rng.choice(self.rooms)
        if r < 0.85:
            return rng.choice(WEIRD)
        return self.text(rng.randint(0, 70))

    def valid_object(self) -> dict[str, Any]:
        rng = self.rng
        kind = rng.choice(KINDS)
        obj: dict[str, Any] = {"type": kind, "ref": self.ref()}
        if kind != "ping":
            obj["room"] = self.room()
        if kind == "send":
            obj["body"] = rng.choice(
                [self.text(rng.randint(1, 40)), "x" * 4000, "x" * 4001, "\ud83d\ude00" * 10]
            )
        if kind == "history":
            if rng.random() < 0.5:
                obj[rng.choice(["before", "after"])] = rng.choice([0, 1, 5, wire.MAX_ID])
            if rng.random() < 0.5:
                obj["limit"] = rng.choice([1, 50, 100])
        return obj

    def wrong_field(self) -> dict[str, Any]:
        obj = self.valid_object()
        name = self.rng.choice(["type", "room", "body", "before", "after", "limit", "ref"])
        obj[name] = self.rng.choice(WEIRD)
        return obj

    def dumps(self, obj: Any) -> bytes:
        rng = self.rng
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, allow_nan=True)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: send them as \\udXXX escapes
            return json.dumps(obj, allow_nan=True).encode()

    def frame(self) -> tuple[bytes, bool]:
        rng = self.rng
        kind = rng.randrange(14)
        if kind == 0:  # random bytes: text if they happen to be UTF-8, else binary
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
            try:
                data.decode("utf-8")
                return data, False
            except UnicodeDecodeError:
                return data, True
        if kind == 1:  # random text
            return self.text(rng.randint(0, 200)).encode(), False
        if kind == 2:  # truncated JSON
            data = self.dumps(self.valid_object())
            cut = rng.randint(0, len(data))
            return data[:cut].decode("utf-8", "ignore").encode(), False
        if kind == 3:  # deep nesting, within and over the limit
            depth = rng.choice([7, 8, 9, 50, 1000, 20000])
            nested = "[" * depth + "]" * depth
            if rng.random() < 0.5:
                return nested.encode(), False
            return f'{{"type":"ping","ref":"deep{depth}","x":{nested}}}'.encode(), False
        if kind == 4:  # huge numbers
            number = rng.choice(
                ["1" + "0" * 400, "9" * 4300, "9" * 4301, "1e400", "-1e400", "1e-400", "-0"]
            )
            field = rng.choice(["limit", "before", "after", "ref", "x"])
            text = f'{{"type":"history","room":"{rng.choice(self.rooms)}","{field}":{number}}}'
            return text.encode(), False
        if kind == 5:  # NaN and friends
            token = rng.choice(["NaN", "Infinity", "-Infinity", "nan", "inf", "undefined"])
            return f'{{"type":"ping","ref":"n{self.n}","x":{token}}}'.encode(), False
        if kind == 6:  # escapes of NUL and lone surrogates, in every string field
            escape = rng.choice(["\\u0000", "\\ud800", "\\udc00", "\\ud83d\\ude00", "\\udbff"])
            obj = self.valid_object()
            name = rng.choice(["type", "room", "body", "ref"])
            marker = "\ue000"
            obj[name] = f"a{marker}b"
            return self.dumps(obj).replace(marker.encode(), escape.encode()), False
        if kind in (7, 8):  # a wrong type for one field
            return self.dumps(self.wrong_field()), False
        if kind == 9:  # unknown types
            obj = self.valid_object()
            obj["type"] = rng.choice(["dance", "", "PING", " ping", "Join", "send ", "message"])
            return self.dumps(obj), False
        if kind == 10:  # a valid frame, as a binary frame
            return self.dumps(self.valid_object()), True
        if kind == 11:  # not an object
            value = rng.choice(WEIRD)
            return self.dumps(value if rng.random() < 0.5 else [value]), False
        if kind == 12:  # big, but under max_frame_bytes
            obj = self.valid_object()
            obj["pad"] = self.text(rng.randint(1000, 14000))
            data = self.dumps(obj)
            while len(data) >= MAX_FUZZ_BYTES:
                obj["pad"] = obj["pad"][: len(obj["pad"]) // 2]
                data = self.dumps(obj)
            return data, False
        return self.dumps(self.valid_object()), False


async def answer_to(client: Client) -> dict[str, Any]:
    """The next frame that is not a room message."""
    while True:
        got = await client.recv()
        if got["type"] != "message":
            return got


@pytest.mark.parametrize("seed", [1, 2])
@ensure
async def test_fuzz_frames_at_a_live_server(make_server, seed):
    server = make_server(max_bad_frames=100_000)
    max_body = server.config.max_body_chars
    fuzz = await connect(server.port, "fuzzer")
    neighbour = await connect(server.port, "neighbour")
    talker = await connect(server.port, "talker")
    await neighbour.join("watch")
    await talker.join("watch")
    frames = FrameGenerator(seed, ROOMS)
    ticks = 0
    joined: set[str] = set()
    for i in range(500):
        payload, is_binary = frames.frame()
        assert len(payload) < MAX_FUZZ_BYTES
        try:
            expected: Any = wire.parse(payload, is_binary, max_body)
        except wire.FrameError as e:
            expected = e
        fuzz.send_raw(payload, binary=is_binary)
        answer = await answer_to(fuzz)
        context = (i, payload[:300], is_binary, answer)
        assert isinstance(answer.get("type"), str), context
        if answer["type"] == "error":
            assert answer["code"] in PROTOCOL_CODES, context
            assert isinstance(answer["message"], str) and answer["message"], context
            assert "Traceback" not in answer["message"], context
        if isinstance(expected, wire.FrameError):
            want = {"type": "error", "code": expected.code, "message": expected.message}
            if expected.ref is not None:
                want["ref"] = expected.ref
            assert answer == want, context
        else:
            kind = type(expected).__name__.lower()
            assert answer.get("ref") == expected.ref, context
            if answer["type"] == "error":
                assert answer["code"] in {"not_member", "forbidden", "unavailable"}, context
            else:
                assert answer["type"] == REPLY[kind], context
                if answer["type"] == "joined":
                    joined.add(answer["room"])
                elif answer["type"] == "left":
                    joined.discard(answer["room"])
        # Nothing else answers this frame: only room messages may come before a pong.
        for extra in await fuzz.drain_to_pong():
            assert extra["type"] == "message" and extra["room"] in joined, (context, extra)

        if i % 25 == 0:
            ticks += 1
            await talker.request({"type": "send", "room": "watch", "body": f"tick {ticks}"})
            got = await neighbour.expect("message")
            assert got["body"] == f"tick {ticks}" and got["user"] == "talker", got

    assert not fuzz.proto.closed.called
    assert (await fuzz.request({"type": "ping"}))["type"] == "pong"
    assert "watch" not in joined
    # The neighbour saw the ticks and nothing from the fuzzer.
    assert await neighbour.drain_to_pong() == []
    assert set(server.chat.errors) <= PROTOCOL_CODES
    assert server.chat.errors[wire.BAD_FRAME] > 50 and server.chat.errors[wire.BAD_REQUEST] > 50


@pytest.mark.parametrize(
    "invalid",
    [
        b"\xff",
        b"\xc3",  # truncated sequence
        b"\xc0\xaf",  # overlong
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xf4\x90\x80\x80",  # above U+10FFFF
    ],
)
@ensure
async def test_invalid_utf8_text_frame_closes_with_1007(make_server, invalid):
    server = make_server(max_bad_frames=100_000)
    bad = await connect(server.port, "bad")
    neighbour = await connect(server.port, "neighbour")
    await neighbour.join("r")
    [bad_proto] = [p for p in server.factory.connections if p.user == "bad"]
    gone = server.factory.when_closed(bad_proto)
    bad.send_raw(b'{"type":"ping","ref":"' + invalid + b'"}')
    assert await bad.wait_closed() == 1007
    await gone.addTimeout(TIMEOUT, reactor)
    assert [p.user for p in server.factory.connections] == ["neighbour"]
    assert (await neighbour.request({"type": "ping"}))["type"] == "pong"
    assert server.chat.errors == {}
