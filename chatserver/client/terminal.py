"""chatserver-client's terminal front end: lines in, commands, what gets printed.

    chatserver-client ws://localhost:8080/ws --user alice --room lobby [--room ops]

Lines typed on stdin go to the current room; messages print as
``[room] #id user: body``, edits and deletes (protocol 1.1 events) as
``[room] #id user edited #target: body`` and ``[room] #id user deleted #target``;
``/join``, ``/leave``, ``/history [N]``, ``/edit ID TEXT``, ``/delete ID``,
``/who``, ``/rooms``, ``/quit``. ``--send TEXT`` posts one message, prints its
id once acked and exits.

``Client`` drives the sans-IO ``Session`` with a ``Link`` (the WebSocket): it
feeds the session what arrives, sends what it asks, reconnects with its
``Backoff`` when the connection drops, sends the session's read markers when
it says they are due (within the pacing's spare room), and prints its events;
``Keyboard`` reads stdin. Importing this module installs no reactor.

Status lines start with ``*`` on stdout: among them ``* [room] N unread`` on
joining a room with messages from others past the user's read marker, and
``* [room] bob is typing`` (at most once per user and room per few seconds).
The client itself never sends ``typing``: the terminal hands it whole lines,
and by then the line is sent, so there is no moment at which it is "typing".

Presence (protocol 1.1): on joining a room, ``* [room] N online``; in the
current room, ``* [room] bob is online`` and ``* [room] bob went offline`` as
people come and go (never for our own user; other rooms' changes are kept
silently, and so is a list the server sends instead of a burst of events).
``/who`` asks the server and prints ``* [room] 3 online: alice, bob, carol``,
with ``, and N more`` when the server's list is cut short.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import unicodedata
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from chatserver.client.connection import Link, close_verdict, log, with_credentials
from chatserver.client.events import Acked, Event, Message, Notice, Problem, Resync
from chatserver.client.outbox import Outgoing
from chatserver.client.session import (
    DEFAULT_BACKLOG,
    DEFAULT_OLDER,
    READ_INTERVAL,
    Backoff,
    Session,
)
from chatserver.wire import HISTORY_LIMIT_MAX, MAX_ID, is_valid_name

QUIT_GRACE = 5.0  # seconds /quit waits for acks of messages already sent
# Frames of the pacing's burst that read markers leave to what the user sends.
READ_RESERVE = 4

HELP = (
    "commands: /join ROOM, /leave [ROOM], /history [N], /edit ID TEXT, /delete ID,"
    " /who (who is online in the current room), /rooms, /quit; other lines are sent to"
    " the current room (start with // to send a line beginning with /)"
)
USAGE = {
    "edit": "/edit ID TEXT: replace the text of your message #ID in the current room",
    "delete": "/delete ID: delete your message #ID in the current room",
}


def parse_line(line: str) -> tuple[str, str]:
    """A typed line as (command, argument); command "say" for a message."""
    if line.startswith("//"):
        return "say", line[1:]
    if line.startswith("/"):
        command, _, arg = line[1:].partition(" ")
        return command.lower(), arg.strip()
    return "say", line


_UNSAFE = {"Cc", "Cs"}
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """Text safe for a terminal: control characters (escape sequences could move the
    cursor, rewrite earlier lines or set the window title) and bidi overrides (which
    could make a line read as something else) are shown escaped, not interpreted."""
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if ch in _BIDI or unicodedata.category(ch) in _UNSAFE
        else ch
        for ch in text
    )


def message_id(text: str) -> int | None:
    """A message id as typed (``12`` or ``#12``, as printed), or None. ASCII digits
    only: ``int`` would also take ``+12``, ``1_2`` or other scripts' digits."""
    found = re.fullmatch(r"#?([0-9]+)", text)
    if found is None:
        return None
    value = int(found.group(1))
    return value if 1 <= value <= MAX_ID else None


def format_message(message: Message) -> str:
    """A message or event as the line the user sees (and tests and scripts parse).
    An edit's body is empty only once its message was deleted (erased with it)."""
    head = f"[{message.room}] #{message.id} {message.user}"
    if message.deletes is not None:
        return f"{head} deleted #{message.deletes}"
    if message.edits is not None:
        return f"{head} edited #{message.edits}: {printable(message.body) or '(deleted)'}"
    if message.deleted:
        return f"{head}: (deleted)"
    suffix = " (edited)" if message.edited is not None else ""
    return f"{head}: {printable(message.body)}{suffix}"


class Client:
    """Connects, reconnects with backoff, paces frames, shows what the session says.

    ``script`` (``--send``): no reconnect; the first ack or error ends the program.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        session: Session,
        write: Callable[[str], None],
        write_err: Callable[[str], None],
        script: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.url = url
        self.session = session
        self.write = write
        self.write_err = write_err
        self.script = script
        self.backoff = Backoff(rng=rng)
        self.link = Link(reactor, url, self)
        self.exit_code: int | None = None
        self.quitting = False
        self._closing = False
        self._retry_call: Any = None
        self._quit_call: Any = None
        self._read_call: Any = None
        self._script_item: Outgoing | None = None
        self._resumed = False

    # connecting

    def start(self) -> None:
        if self.script is not None:
            self._script_item = self.session.say(self.script)
            self.session.drain()
        self._connect()

    def _connect(self) -> None:
        self._retry_call = None
        self.link.connect()

    def connect_failed(self, reason: str) -> None:
        self._lost(f"cannot connect ({reason})", None)

    def opened(self) -> None:
        self._resumed = False
        self._show([Notice(f"connected to {self.url.split('?')[0]}")])
        self.session.connected()
        self._flush()

    def received(self, frame: Any) -> None:
        self.session.handle(frame)
        self._flush()

    def closed(self, was_open: bool, code: int | None, reason: str | None) -> None:
        if was_open:
            self.session.disconnected()
            self.session.drain()
        verdict = close_verdict(code, reason)
        if self._closing:
            self._stop(self.exit_code or 0)
        elif verdict is not None:
            self.write_err(f"! {verdict}")
            self._stop(1)
        else:
            what = f"connection closed ({code} {reason or ''})".replace(" )", ")")
            self._lost(what if was_open else f"cannot connect ({reason or code})", code)

    def _lost(self, what: str, code: int | None) -> None:
        if self.quitting and not self.session.outbox.items:
            self._stop(self.exit_code or 0)
            return
        if self.script is not None:
            self.write_err(f"! {what}: the message may not have been stored")
            self._stop(1)
            return
        delay = self.backoff.next_delay()
        self._show([Notice(f"{what}; reconnecting in {delay:.1f}s")])
        self._retry_call = self.reactor.callLater(delay, self._connect)

    # sending

    def _flush(self) -> None:
        frames, events = self.session.drain()
        self.link.send(frames)
        if self.link.is_open and not self._resumed and self.session.resumed():
            # Only a connection that got every room back live counts as a success:
            # one whose catch-up keeps failing must keep backing off.
            self._resumed = True
            self.backoff.reset()
        self._show(events)
        if self.quitting and not self._closing and not self.session.outbox.items:
            self._close()
        else:
            self._schedule_reads()

    def _schedule_reads(self, at_least: float = 0.0) -> None:
        """One timer for every room's read marker, set by the session's ``read_delay``;
        a timer already set stays (it is at most ``READ_INTERVAL`` away)."""
        if self._closing or (self._read_call is not None and self._read_call.active()):
            return
        delay = self.session.read_delay()
        if delay is not None and self.link.is_open:
            self._read_call = self.reactor.callLater(max(delay, at_least), self._send_reads)

    def _send_reads(self) -> None:
        """The due markers, as many as the pacing has room for now; the others wait a
        full interval, by which the bucket has refilled (no spinning on an empty one)."""
        self._read_call = None
        budget = self.link.spare() - READ_RESERVE
        if budget > 0:
            self.session.send_reads(budget)
        if self.session.read_delay() == 0:  # some did not fit
            self._schedule_reads(at_least=READ_INTERVAL)
        self._flush()  # sends them, and sets the timer for the next ones

    # showing

    def _show(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Message):
                if self.script is None:
                    self.write(format_message(event))
            elif isinstance(event, Notice):
                if self.script is None:
                    self.write(f"* {event.text}")
            elif isinstance(event, Problem):
                self.write_err(f"! {event.code}: {printable(event.message)}")
                if self.script is not None:
                    self._finish(1)
            elif isinstance(event, Acked):
                if self._script_item is not None and event.local == self._script_item.local:
                    self.write(str(event.id))
                    self._finish(0)
            elif isinstance(event, Resync) and self.link.is_open:
                log.warn("reconnecting: {reason}", reason=event.reason)
                self.link.close(1000, event.reason[:100])

    # the user

    def line(self, text: str) -> None:
        command, arg = parse_line(text)
        if command == "say":
            if arg.strip():
                self.session.say(arg)
        elif command == "join" and arg:
            self.session.join(arg)
        elif command == "leave":
            self.session.leave(arg or None)
        elif command in USAGE:
            self._change(command, arg)
        elif command == "history":
            limit = int(arg) if arg.isdigit() else DEFAULT_OLDER
            self.session.older(max(1, min(HISTORY_LIMIT_MAX, limit)))
        elif command == "who" and not arg:
            self.session.who()
        elif command == "rooms":
            names = ", ".join(self.session.rooms) or "none"
            self._show([Notice(f"rooms: {names}; current: {self.session.current}")])
        elif command == "quit":
            self.quit()
            return
        elif command == "help":
            self._show([Notice(HELP)])
        else:
            self._show([Problem("usage", HELP)])
        self._flush()

    def _change(self, command: str, arg: str) -> None:
        """``/edit ID TEXT`` or ``/delete ID``; a malformed one is not sent at all."""
        words = arg.split(None, 1)
        target = message_id(words[0]) if words else None
        if target is None or len(words) != (2 if command == "edit" else 1):
            self._show([Problem("usage", USAGE[command])])
        elif command == "edit":
            self.session.edit(target, words[1])
        else:
            self.session.delete(target)

    def quit(self) -> None:
        """Leave once every message written is acked, or after QUIT_GRACE seconds; so
        ``printf 'hi\\n' | chatserver-client ...`` posts its lines before it exits,
        even if stdin ends before the connection is up."""
        if self.quitting:
            return
        self.quitting = True
        if self.link.is_open:
            # What was printed in the last interval is marked read before leaving.
            self.session.send_reads(max(0, self.link.spare()), force=True)
        if self.session.outbox.items:
            self._quit_call = self.reactor.callLater(QUIT_GRACE, self._give_up)
        self._flush()  # sends those; closes now unless a message waits for its ack

    def _give_up(self) -> None:
        self._quit_call = None
        for item in self.session.outbox.items:
            self.write_err(f"! not sent: {item.summary()}")
        self.exit_code = 1
        self._close()

    def _finish(self, code: int) -> None:
        """Script mode is done: close cleanly, then stop with this exit code."""
        if self.exit_code is None:
            self.exit_code = code
            self.quitting = True
            self._close()

    def _close(self) -> None:
        self._closing = True
        if self.link.is_open:
            self.link.close(1000)
        else:
            self._stop(self.exit_code or 0)

    def _stop(self, code: int) -> None:
        if self.exit_code is None or self.exit_code == 0:
            self.exit_code = code
        self.link.stop()
        for call in (self._retry_call, self._quit_call, self._read_call):
            if call is not None and call.active():
                call.cancel()
        if self.reactor.running:
            self.reactor.stop()


@implementer(IHalfCloseableProtocol)
class Keyboard(LineReceiver):
    """Stdin lines to the client; stdout for what it shows. End of input is /quit,
    with stdout kept open (half-close) so the last messages and acks still print."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 16

    def __init__(self, client: Client) -> None:
        self.client = client

    def lineReceived(self, line: bytes) -> None:
        self.client.line(line.decode("utf-8", errors="replace").rstrip("\r"))

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would close stdin and stdout; a long paste is not worth that.
        self.client.write_err("! line too long: not sent")

    def readConnectionLost(self) -> None:
        self.client.quit()

    def writeConnectionLost(self) -> None:
        self.client.quit()

    def connectionLost(self, reason: Any = None) -> None:
        self.client.quit()

    def show(self, text: str) -> None:
        if self.transport is not None:
            self.transport.write(text.encode("utf-8", errors="replace") + b"\n")


# --- the program -------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chatserver-client",
        description="Terminal chat client for chatserver (protocol 1.1). Lines on stdin go"
        " to the current room; " + HELP + ".",
    )
    parser.add_argument("url", help="WebSocket URL, e.g. ws://localhost:8080/ws")
    parser.add_argument("--user", help="user name (auth = none); with --token, defaults to its sub")
    parser.add_argument("--token", help="JWT (auth = token)")
    parser.add_argument(
        "--room",
        action="append",
        default=[],
        help="room to join (repeatable; the first is current)",
    )
    parser.add_argument("--send", metavar="TEXT", help="send TEXT to the first room, print its id")
    parser.add_argument(
        "--backlog",
        type=int,
        default=DEFAULT_BACKLOG,
        help=f"recent messages shown when joining a room (0-{HISTORY_LIMIT_MAX})",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: frames)")
    args = parser.parse_args(argv)
    if not args.user and not args.token:
        parser.error("give --user NAME (development mode) or --token JWT")
    if args.user and not is_valid_name(args.user):
        parser.error("--user must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    for room in args.room:
        if not is_valid_name(room):
            parser.error(f"bad room name {room!r}: 1-64 characters of A-Z a-z 0-9 _ . : -")
    if args.send is not None and not args.room:
        parser.error("--send needs a --room")
    if args.send == "":
        parser.error("--send needs a non-empty TEXT")
    if not 0 <= args.backlog <= HISTORY_LIMIT_MAX:
        parser.error(f"--backlog must be 0-{HISTORY_LIMIT_MAX}")
    try:
        args.url = with_credentials(args.url, args.user, args.token)
    except ValueError as e:
        parser.error(str(e))
    return args


def token_user(token: str) -> str | None:
    """The ``sub`` of a JWT, unverified: only to recognise our own messages in history
    (the server verifies the token; the client cannot and need not)."""
    import jwt

    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        return None
    return sub if isinstance(sub, str) else None


def _start_logging(verbose: int) -> None:
    level = [LogLevel.warn, LogLevel.info, LogLevel.debug][min(verbose, 2)]
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    # stdout is the chat itself: logs must not be mixed into it.
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: list[str] | None = None) -> int:
    """Run the client until it ends and return its exit status: 0, or 1 when a message
    was not sent or reconnecting cannot help (bad arguments exit 2, from argparse)."""
    args = parse_args(argv)
    _start_logging(args.verbose)

    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    user = args.user or (token_user(args.token) if args.token else None)
    script = args.send
    session = Session(
        user,
        args.room[:1] if script is not None else args.room,
        backlog=0 if script is not None else args.backlog,
        clock=reactor.seconds,
        mark_read=script is None,  # --send prints no messages, so reads none
        presence=script is None,  # nor who is online
    )

    def write_err(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    if script is not None:

        def write(text: str) -> None:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

        client = Client(reactor, args.url, session, write, write_err, script=script)
    else:
        keyboard: Any = None
        client = Client(reactor, args.url, session, lambda t: keyboard.show(t), write_err)
        keyboard = Keyboard(client)
        StandardIO(keyboard, reactor=reactor)
    reactor.callWhenRunning(client.start)
    reactor.run()
    return client.exit_code or 0
