"""The web page at / in a real headless Chromium, driven by Selenium, against real servers.

Selenium blocks, and the servers run on this process's reactor: every browser
call runs in a thread (``deferToThread``) so the reactor keeps serving. Waits
are explicit (``WebDriverWait`` on a condition), never fixed sleeps. Debian's
/usr/bin/chromium and /usr/bin/chromedriver are used as they are: Selenium
downloads nothing, and a machine without them fails these tests (tests/run
installs them).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from clientproc import spawn_client, talk_elsewhere
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from wsclient import connect, handshake_status, in_room

ensure = pytest_twisted.ensureDeferred
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"
WAIT = 20.0
SECRET = "test-secret-that-is-long-enough-for-hs256"

CID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Every message of a room as the page shows it: [id or None, user, body, classes,
# cid or None, the texts of its action buttons, its "(edited)" flag or ""].
READ_ROOM = """
return [...document.querySelectorAll('#messages li.msg')]
  .filter((li) => li.dataset.room === arguments[0])
  .map((li) => [li.dataset.id === undefined ? null : Number(li.dataset.id),
                li.querySelector('.user').textContent,
                li.querySelector('.body').textContent,
                li.className,
                li.dataset.cid === undefined ? null : li.dataset.cid,
                [...li.querySelectorAll('.actions button')].map((b) => b.textContent),
                li.querySelector('.flag') ? li.querySelector('.flag').textContent : '']);
"""

# The element matching a selector inside the message with this room and id, or null.
BUTTON = """
const li = [...document.querySelectorAll('#messages li.msg')]
  .find((li) => li.dataset.room === arguments[0] && li.dataset.id === String(arguments[1]));
return li ? li.querySelector(arguments[2]) : null;
"""

# Installed before the page's own script: records every frame the page sends and
# gets, and lets a test rewrite or swallow them (window.__tap.outgoing/incoming:
# (frame, socket) -> false to swallow / the frame to deliver, or null).
TAP = """
(() => {
  const Real = window.WebSocket;
  const tap = (window.__tap = { sent: [], got: [], outgoing: null, incoming: null, socket: null });
  window.WebSocket = class extends Real {
    constructor(...args) {
      super(...args);
      tap.socket = this;
    }
    send(data) {
      const frame = JSON.parse(data);
      tap.sent.push(frame);
      if (tap.outgoing && tap.outgoing(frame, this) === false) return;
      super.send(data);
    }
    set onmessage(handler) {
      super.onmessage = (event) => {
        if (this.readyState !== Real.OPEN) return; // closed by a hook: what follows is lost
        let frame = JSON.parse(event.data);
        if (tap.incoming) frame = tap.incoming(frame, this);
        if (!frame) return;
        tap.got.push(frame);
        handler({ data: JSON.stringify(frame) });
      };
    }
    get onmessage() {
      return super.onmessage;
    }
  };
})();
"""

# Loses the answer to the next send (the message is stored) in one of three ways:
# "error": the ack becomes an `unavailable` error (as after a timeout);
# "cut": the connection drops instead (the catch-up will hold the message);
# "cut-hide": as "cut", and history pages leave the message out too (as if it
# had been stored just after the catch-up was read). Its live copy is swallowed.
LOSE_NEXT_ACK = """
const tap = window.__tap;
const mode = arguments[0];
let lost = null;
tap.incoming = (frame, socket) => {
  if (lost === null && frame.type === 'ack' && frame.cid) {
    lost = frame.cid;
    if (mode === 'error') {
      return {type: 'error', code: 'unavailable', message: 'answer lost', ref: frame.ref};
    }
    socket.close();
    return null;
  }
  if (lost !== null && frame.type === 'message' && frame.cid === lost) return null;
  if (lost !== null && mode === 'cut-hide' && frame.type === 'history') {
    return {...frame, messages: frame.messages.filter((m) => m.cid !== lost)};
  }
  return frame;
};
"""


@pytest.fixture
def browsers() -> Any:
    """Starts headless Chromium instances on demand (each its own profile); quits them."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} missing: the browser tests need Debian's chromium and"
            " chromium-driver packages (tests/run installs them)"
        )
    drivers: list[webdriver.Chrome] = []

    def start() -> webdriver.Chrome:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in (
            "--headless=new",
            "--no-sandbox",  # tests may run as root (CI containers)
            "--disable-dev-shm-usage",
            "--window-size=1000,760",
            "--disable-gpu",
        ):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


class Page:
    """One browser tab showing the chat page; every call runs in a thread."""

    def __init__(self, driver: webdriver.Chrome, port: int) -> None:
        self.driver = driver
        self.base = f"http://127.0.0.1:{port}/"

    async def call(self, fn: Any, *args: Any) -> Any:
        return await deferToThread(fn, *args)

    async def until(self, condition: Any, what: str, timeout: float = WAIT) -> Any:
        def wait() -> Any:
            return WebDriverWait(self.driver, timeout).until(condition, what)

        return await self.call(wait)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, source, *args)

    async def open(self, user: str | None = None, token: str | None = None) -> None:
        def go() -> None:
            if token is not None:
                self.driver.get(f"{self.base}#token={token}")
                return
            self.driver.get(self.base)
            field = self.driver.find_element(By.ID, "name")
            field.clear()  # opened before: the page remembers the name
            field.send_keys(user)
            self.driver.find_element(By.ID, "connect").click()

        await self.call(go)
        await self.until(lambda d: self.state(d) == "online", "connected")

    @staticmethod
    def state(driver: Any) -> str:
        return driver.find_element(By.ID, "status").get_attribute("data-state")

    async def join(self, room: str) -> None:
        def go() -> None:
            field = self.driver.find_element(By.ID, "room")
            field.clear()
            field.send_keys(room)
            self.driver.find_element(By.ID, "join").click()

        await self.call(go)
        await self.until_live(room)

    async def until_live(self, room: str) -> None:
        selector = f'#rooms li[data-room="{room}"][data-phase="live"]'
        await self.until(lambda d: d.find_elements(By.CSS_SELECTOR, selector), f"{room} live")

    async def say(self, text: str) -> None:
        def go() -> None:
            self.driver.find_element(By.ID, "message").send_keys(text)
            self.driver.find_element(By.ID, "send").click()

        await self.call(go)

    async def reload(self, user: str) -> None:
        def go() -> None:
            self.driver.refresh()
            field = self.driver.find_element(By.ID, "name")
            field.clear()  # the page remembers the name
            field.send_keys(user)
            self.driver.find_element(By.ID, "connect").click()

        await self.call(go)
        await self.until(lambda d: self.state(d) == "online", "connected again")

    async def messages(self, room: str) -> list[list[Any]]:
        return await self.script(READ_ROOM, room)

    async def until_row(self, room: str, id: int, test: Any, what: str) -> list[Any]:
        """Wait until message ``id`` of ``room`` is shown and ``test(row)`` holds."""

        def ok(driver: Any) -> Any:
            for row in driver.execute_script(READ_ROOM, room):
                if row[0] == id and test(row):
                    return row
            return False

        return await self.until(ok, f"#{id} in {room}: {what}")

    async def button(self, room: str, id: int, selector: str) -> Any:
        return await self.until(
            lambda d: d.execute_script(BUTTON, room, id, selector), f"{selector} on #{id}"
        )

    async def edit(self, room: str, id: int, text: str, key: str | None = Keys.ENTER) -> Any:
        """Edit from the keyboard: Enter on the Edit button, then type, then ``key``
        (None: the editor stays open); returns the editor's field."""
        edit = await self.button(room, id, ".actions .edit")
        await self.call(edit.send_keys, Keys.ENTER)
        field = await self.button(room, id, ".editor textarea")
        assert await self.script("return document.activeElement === arguments[0]", field)

        def go() -> None:
            field.clear()
            field.send_keys(text, *([key] if key else []))

        await self.call(go)
        return field

    async def delete(self, room: str, id: int) -> None:
        delete = await self.button(room, id, ".actions .delete")
        await self.call(delete.click)
        alert = await self.until(expected_conditions.alert_is_present(), "asked to confirm")
        await self.call(alert.accept)

    async def tap(self, key: str) -> Any:
        return await self.script(f"return window.__tap.{key}")

    async def until_shown(self, room: str, body: str, confirmed: bool = True) -> list[Any]:
        """Wait until ``body`` is shown in ``room`` (with its id, unless not ``confirmed``)."""

        def shown(driver: Any) -> Any:
            for row in driver.execute_script(READ_ROOM, room):
                if row[2] == body and (row[0] is not None or not confirmed):
                    return row
            return False

        return await self.until(shown, f"{body!r} shown in {room}")

    async def screenshot(self, tmp_path: Path, name: str) -> Path:
        """Saved under the test's tmp dir and copied to tests/artifacts/ for people to look at."""
        path = tmp_path / name
        assert await self.call(self.driver.save_screenshot, str(path))
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(path, ARTIFACTS / name)
        return path


async def open_page(
    browsers: Any, port: int, user: str | None = None, preload: str | None = None, **kw: Any
) -> Page:
    """``preload``: a script run in every document before the page's own (``TAP``)."""
    driver = await deferToThread(browsers)
    if preload is not None:
        await deferToThread(
            driver.execute_cdp_cmd, "Page.addScriptToEvaluateOnNewDocument", {"source": preload}
        )
    page = Page(driver, port)
    await page.open(user, **kw)
    return page


async def next_message(client: Any) -> dict:
    while True:
        got = await client.recv()
        if got["type"] == "message":
            return got


async def message_with(client: Any, body: str) -> dict:
    while True:
        got = await client.recv()
        if got["type"] == "message" and got["body"] == body:
            return got


def assert_once_in_order(rows: list[list[Any]], bodies: list[str]) -> None:
    """Every body once, every id once and consecutive from 1, nothing pending or failed."""
    ids = [row[0] for row in rows]
    assert ids == list(range(1, len(bodies) + 1)), rows
    assert sorted(row[2] for row in rows) == sorted(bodies), rows
    assert not [row for row in rows if "pending" in row[3] or "failed" in row[3]], rows


@ensure
async def test_a_handshake_offering_compression_opens(server):
    """Browsers always offer permessage-deflate; the server must still answer 101."""
    status = await handshake_status(
        server.port,
        headers={"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"},
    )
    assert status == 101


@ensure
async def test_two_pages_chat_with_each_other(server, browsers, tmp_path):
    alice, bob = [await open_page(browsers, server.port, name) for name in ("alice", "bob")]
    await alice.join("lobby")
    await bob.join("lobby")
    await alice.say("hi bob")
    assert (await bob.until_shown("lobby", "hi bob"))[:2] == [1, "alice"]
    await bob.say("hi alice, from a page")
    assert (await alice.until_shown("lobby", "hi alice, from a page"))[:2] == [2, "bob"]
    await alice.until_shown("lobby", "hi bob")  # acked: has its id, no longer pending
    for page in (alice, bob):
        assert_once_in_order(await page.messages("lobby"), ["hi bob", "hi alice, from a page"])
    await alice.screenshot(tmp_path, "two-pages.png")


@ensure
async def test_history_scrolls_back_errors_show_and_a_phone_fits(make_server, browsers, tmp_path):
    server = make_server(max_body_chars=40)
    carol = await connect(server.port, "carol")
    await carol.join("old")
    for i in range(1, 71):
        await carol.request({"type": "send", "room": "old", "body": f"old {i}"})
    page = await open_page(browsers, server.port, "alice")
    await page.join("old")
    await page.until_shown("old", "old 21")
    assert [row[0] for row in await page.messages("old")] == list(range(21, 71))  # the backlog
    await page.call(lambda: page.driver.find_element(By.ID, "older").click())
    await page.until_shown("old", "old 1")
    assert [row[0] for row in await page.messages("old")] == list(range(1, 71))
    older = await page.call(page.driver.find_element, By.ID, "older")
    assert not await page.call(older.is_enabled)

    await page.say("x" * 41)
    error = await page.until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '#errors li.error[data-code="too_large"]'),
        "too_large error shown",
    )
    assert "longer than 40" in await page.call(lambda: error[0].text)
    failed = await page.until_shown("old", "x" * 41, confirmed=False)
    assert "failed" in failed[3]

    await page.call(page.driver.set_window_size, 390, 800)  # a phone
    fits = await page.script(
        "return document.documentElement.scrollWidth <= window.innerWidth"
        " && !!document.querySelector('meta[name=viewport]')"
    )
    assert fits
    await page.screenshot(tmp_path, "phone.png")


@ensure
async def test_page_and_terminal_client_chat(server, browsers):
    page = await open_page(browsers, server.port, "alice")
    await page.join("mixed")
    proc = spawn_client(f"ws://127.0.0.1:{server.port}/ws", "--user", "bob", "--room", "mixed")
    try:
        await proc.expect(r"^\* joined mixed$")
        await page.say("from the page")
        await proc.expect(r"^\[mixed\] #1 alice: from the page$")
        proc.type("from the terminal")
        assert (await page.until_shown("mixed", "from the terminal"))[:2] == [2, "bob"]
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()
    assert_once_in_order(await page.messages("mixed"), ["from the page", "from the terminal"])


@ensure
async def test_token_from_the_url_fragment(make_server, browsers):
    server = make_server(auth="token", jwt_secret=SECRET)
    token = jwt.encode({"sub": "tina", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    page = await open_page(browsers, server.port, token=token)
    await page.join("t")
    await page.say("signed by token")
    assert (await page.until_shown("t", "signed by token"))[:2] == [1, "tina"]


@ensure
async def test_page_resumes_after_a_server_restart_nothing_missing_or_doubled(
    make_server, browsers, tmp_path
):
    database_url = f"sqlite:///{tmp_path}/restart.sqlite3"
    server = make_server(database_url=database_url)
    port = server.port
    page = await open_page(browsers, port, "alice")
    await page.join("r")
    bob = await connect(port, "bob")
    await bob.join("r")
    await bob.request({"type": "send", "room": "r", "body": "before"})
    await page.until_shown("r", "before")

    await server.stopService()
    await page.until(lambda d: Page.state(d) in ("offline", "connecting"), "page offline")
    await page.say("typed while offline")  # pending, sent once back
    await page.until_shown("r", "typed while offline", confirmed=False)

    # Nothing listens on the port; the chat goes on through another server on
    # the same database, from a WebSocket client and the terminal client.
    await talk_elsewhere(make_server, database_url, "r", "by cli")

    make_server(listen=(f"tcp:{port}:interface=127.0.0.1",), database_url=database_url)
    bob = await connect(port, "bob")
    await bob.join("r")
    await bob.request({"type": "send", "room": "r", "body": "after"})
    await page.until(lambda d: Page.state(d) == "online", "page back online")
    await page.until_shown("r", "after")
    await page.until_shown("r", "typed while offline")  # sent after the catch-up, acked
    await message_with(bob, "typed while offline")
    await bob.request({"type": "send", "room": "r", "body": "last"})
    await page.until_shown("r", "last")

    rows = await page.messages("r")
    assert_once_in_order(
        rows,
        [
            "before",
            *(f"away {i}" for i in range(1, 6)),
            "by cli",
            "after",
            "typed while offline",
            "last",
        ],
    )
    # What happened during the outage is in the order it was stored.
    assert [row[2] for row in rows[:7]] == ["before", *(f"away {i}" for i in range(1, 6)), "by cli"]
    await page.screenshot(tmp_path, "after-restart.png")


# -- protocol 1.1: cids, edits and deletes ------------------------------------------------


def sends_of(frames: list[dict], body: str) -> list[dict]:
    return [f for f in frames if f.get("type") == "send" and f.get("body") == body]


@ensure
async def test_one_body_sent_twice_quickly_confirms_twice_by_cid(server, browsers):
    bob = await connect(server.port, "bob")
    await bob.join("c")
    page = await open_page(browsers, server.port, "alice")
    await page.join("c")

    def twice() -> None:  # back to back, in one go
        for _ in range(2):
            page.driver.find_element(By.ID, "message").send_keys("same")
            page.driver.find_element(By.ID, "send").click()

    await page.call(twice)
    frames = [await message_with(bob, "same"), await message_with(bob, "same")]
    assert [f["id"] for f in frames] == [1, 2]
    cids = [f["cid"] for f in frames]
    assert all(CID.fullmatch(cid) for cid in cids) and cids[0] != cids[1], cids

    def both_confirmed(driver: Any) -> Any:
        rows = driver.execute_script(READ_ROOM, "c")
        return rows if [row[0] for row in rows] == [1, 2] else False

    rows = await page.until(both_confirmed, "both acked")
    # Each line holds the id the server gave its own cid: matched by cid, not body.
    assert [(row[0], row[2], row[4]) for row in rows] == [
        (1, "same", cids[0]),
        (2, "same", cids[1]),
    ]
    assert_once_in_order(rows, ["same", "same"])
    assert await bob.drain_to_pong() == []
    # From history after a reload: the same cids, and our own messages editable.
    await page.reload("alice")
    rows = await page.until(both_confirmed, "both shown again")
    assert [(row[0], row[4], row[5]) for row in rows] == [
        (1, cids[0], ["Edit", "Delete"]),
        (2, cids[1], ["Edit", "Delete"]),
    ]


@ensure
async def test_cids_without_random_uuid_are_random_hex(server, browsers):
    """Plain http on a LAN address is not a secure context: no crypto.randomUUID."""
    bob = await connect(server.port, "bob")
    await bob.join("c")
    page = await open_page(
        browsers, server.port, "dave", preload="delete Crypto.prototype.randomUUID;"
    )
    assert await page.script("return typeof crypto.randomUUID") == "undefined"
    await page.join("c")
    await page.say("no uuid here")
    await page.say("nor here")
    cids = [(await message_with(bob, body))["cid"] for body in ("no uuid here", "nor here")]
    assert all(re.fullmatch(r"[0-9a-f]{32}", cid) for cid in cids) and cids[0] != cids[1], cids
    await page.until_shown("c", "nor here")


@ensure
async def test_editing_and_deleting_own_messages_from_the_page(make_server, browsers, tmp_path):
    server = make_server(max_body_chars=40)
    bob = await connect(server.port, "bob")
    await bob.join("e")
    page = await open_page(browsers, server.port, "alice")
    await page.join("e")
    await bob.request({"type": "send", "room": "e", "body": "bob's own"})
    assert (await next_message(bob))["id"] == 1
    await page.say("helo wrold")
    sent = await next_message(bob)
    assert (sent["id"], sent["body"]) == (2, "helo wrold")
    await page.until_row("e", 2, lambda row: row[5] == ["Edit", "Delete"], "Edit and Delete")
    # Someone else's message offers neither.
    assert [row[5] for row in await page.messages("e")] == [[], ["Edit", "Delete"]]

    await page.edit("e", 2, "hello world")
    event = await next_message(bob)
    assert {k: event.get(k) for k in ("id", "user", "body", "edits")} == {
        "id": 3,
        "user": "alice",
        "body": "hello world",
        "edits": 2,
    }
    assert CID.fullmatch(event["cid"]) and event["cid"] != sent["cid"]
    row = await page.until_row("e", 2, lambda row: row[2] == "hello world", "edited")
    assert "edited" in row[3] and row[6] == "(edited)" and row[5] == ["Edit", "Delete"]

    # Escape cancels: nothing is sent, the text stays.
    field = await page.edit("e", 2, "never sent", key=None)
    await page.screenshot(tmp_path, "edit-open.png")
    await page.call(field.send_keys, Keys.ESCAPE)
    await page.until(
        lambda d: not d.execute_script(BUTTON, "e", 2, ".editor"), "editor closed by Escape"
    )
    # Refused (too_large): shown like other errors; the message keeps its text.
    await page.edit("e", 2, "x" * 41)
    error = await page.until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '#errors li.error[data-code="too_large"]'),
        "too_large error shown",
    )
    assert "longer than 40" in await page.call(lambda: error[0].text)
    await page.until_row(
        "e", 2, lambda row: row[2] == "hello world" and "changing" not in row[3], "edit undone"
    )
    assert not await page.script(BUTTON, "e", 2, ".draft")

    await page.call(page.driver.set_window_size, 390, 800)  # a phone: the buttons are there
    fits = await page.script("return document.documentElement.scrollWidth <= window.innerWidth")
    assert fits
    delete = await page.button("e", 2, ".actions .delete")
    assert await page.call(delete.is_displayed)
    await page.screenshot(tmp_path, "edit-phone.png")

    await page.delete("e", 2)
    event = await next_message(bob)
    assert (event["id"], event["user"], event["body"], event["deletes"]) == (4, "alice", "", 2)
    row = await page.until_row("e", 2, lambda row: "deleted" in row[3], "deleted")
    assert row[2] == "message deleted" and row[5] == [] and row[6] == ""
    # The events are no lines of their own.
    assert [row[0] for row in await page.messages("e")] == [1, 2]
    assert await bob.drain_to_pong() == []  # the cancelled and the refused edit sent nothing
    await page.screenshot(tmp_path, "edit-delete.png")


@ensure
async def test_changes_by_others_show_live_resume_and_fold_in_history(server, browsers, tmp_path):
    carol = await connect(server.port, "carol")
    await carol.join("f")
    page = await open_page(browsers, server.port, "alice", preload=TAP)
    await page.join("f")
    await page.join("side")  # "f" is in the background: its unread count shows
    for body in ("one", "two", "three"):
        await carol.request({"type": "send", "room": "f", "body": body})
    await page.until_shown("f", "three")
    unread = "return document.querySelector('#rooms li[data-room=\"f\"] .unread').textContent"
    assert await page.script(unread) == "3"

    # Live: an edit (id 4) and a delete (id 5) by their author, on another client.
    await carol.request({"type": "edit", "room": "f", "id": 1, "body": "one, edited"})
    await carol.request({"type": "delete", "room": "f", "id": 2})
    await page.until_row("f", 2, lambda row: "deleted" in row[3], "deleted live")
    row = await page.until_row("f", 1, lambda row: row[2] == "one, edited", "edited live")
    assert "edited" in row[3] and row[6] == "(edited)" and row[5] == []
    assert [row[0] for row in await page.messages("f")] == [1, 2, 3]
    assert await page.script(unread) == "3"  # changes are not news

    # Changes while the page is away (its joins fail until released): the catch-up
    # starts after the newest id the page saw, the delete event's.
    await page.script(
        "const tap = window.__tap;"
        "tap.outgoing = (frame, socket) => frame.type !== 'join' || (socket.close(), false);"
        "tap.socket.close();"
    )
    await page.until(
        lambda d: d.find_elements(
            By.CSS_SELECTOR, '#rooms li[data-room="f"]:not([data-phase="live"])'
        ),
        "page away",
    )
    await carol.request({"type": "edit", "room": "f", "id": 3, "body": "three, edited"})  # 6
    await carol.request({"type": "delete", "room": "f", "id": 1})  # 7
    await carol.request({"type": "send", "room": "f", "body": "four"})  # 8
    await page.script("window.__tap.outgoing = null;")
    await page.until_shown("f", "four")
    catchups = [
        f["after"] for f in await page.tap("sent") if f["type"] == "history" and "after" in f
    ]
    assert catchups == [5], catchups
    rows = await page.messages("f")
    assert [(row[0], row[2], "deleted" in row[3], row[6]) for row in rows] == [
        (1, "message deleted", True, ""),
        (2, "message deleted", True, ""),
        (3, "three, edited", False, "(edited)"),
        (8, "four", False, ""),
    ]
    # The count after the reconnect is the server's: carol's messages after the
    # (never set) marker, deleted ones left out: 3 and 8.
    assert await page.script(unread) == "2"

    # Scroll-back: 50 more messages and one more edit of 3 (id 59), then a reload.
    # The backlog (ids 10-59) holds that edit but not its target; "older" brings
    # ids 1-9, folded; no event is ever a line.
    for i in range(9, 59):
        await carol.request({"type": "send", "room": "f", "body": f"filler {i}"})
    await carol.request({"type": "edit", "room": "f", "id": 3, "body": "three, again"})
    await page.until_row("f", 3, lambda row: row[2] == "three, again", "edited again live")
    await page.reload("alice")
    await page.until_live("f")
    await page.call(
        lambda: page.driver.find_element(By.CSS_SELECTOR, "#rooms .pick[data-room=f]").click()
    )
    await page.until_shown("f", "filler 58")
    assert [row[0] for row in await page.messages("f")] == list(range(10, 59))
    await page.call(lambda: page.driver.find_element(By.ID, "older").click())
    await page.until_shown("f", "four")
    rows = await page.messages("f")
    assert [row[0] for row in rows] == [1, 2, 3, 8, 9, *range(10, 59)]
    assert [(row[2], "deleted" in row[3], row[6], row[5]) for row in rows[:4]] == [
        ("message deleted", True, "", []),
        ("message deleted", True, "", []),
        ("three, again", False, "(edited)", []),
        ("four", False, "", []),
    ]
    await page.script("document.getElementById('messages').scrollTop = 0")
    await page.screenshot(tmp_path, "folded-history.png")


@ensure
async def test_a_message_or_edit_keeps_its_cid_through_retry_and_reconnects(server, browsers):
    bob = await connect(server.port, "bob")
    await bob.join("k")
    page = await open_page(browsers, server.port, "alice", preload=TAP)
    await page.join("k")

    async def settled(body: str, id: int) -> list[dict]:
        """Bob got exactly one copy; the page shows it once, with that id; the
        page's sends of it all carried the copy's cid."""
        got = await message_with(bob, body)
        assert got["id"] == id
        await page.until_row("k", id, lambda row: row[2] == body, "confirmed")
        rows = [row for row in await page.messages("k") if row[2] == body]
        assert len(rows) == 1 and rows[0][4] == got["cid"], rows
        sends = sends_of(await page.tap("sent"), body)
        assert {f["cid"] for f in sends} == {got["cid"]}, sends
        return sends

    # Retry after an error although the message was stored: the same cid gets
    # `duplicate` and the stored id.
    await page.script(LOSE_NEXT_ACK, "error")
    await page.say("stored once")
    failed = await page.until_shown("k", "stored once", confirmed=False)
    await page.until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#messages li.msg.failed .retry"), "Retry shown"
    )
    await page.call(
        lambda: page.driver.find_element(By.CSS_SELECTOR, "li.msg.failed .retry").click()
    )
    assert len(await settled("stored once", 1)) == 2
    acks = [f for f in await page.tap("got") if f["type"] == "ack" and f.get("cid") == failed[4]]
    assert [(f["id"], f.get("duplicate")) for f in acks] == [(1, True)]

    # The connection drops before the ack, and the catch-up does not show the
    # message: sent again with its cid, answered `duplicate`.
    await page.script(LOSE_NEXT_ACK, "cut-hide")
    await page.say("resent once")
    assert len(await settled("resent once", 2)) == 2
    acks = [f for f in await page.tap("got") if f["type"] == "ack" and f["id"] == 2]
    assert [f.get("duplicate") for f in acks] == [True]

    # The connection drops before the ack, the catch-up shows it: confirmed by
    # its cid, not sent again.
    await page.script(LOSE_NEXT_ACK, "cut")
    await page.say("found in the catch-up")
    assert len(await settled("found in the catch-up", 3)) == 1
    assert not [f for f in await page.tap("got") if f["type"] == "ack" and f["id"] == 3]

    # An edit goes the same way: sent again after the drop with its cid, applied once.
    await page.script(LOSE_NEXT_ACK, "cut-hide")
    await page.edit("k", 3, "found, then edited")
    event = await next_message(bob)
    assert (event["id"], event["edits"], event["body"]) == (4, 3, "found, then edited")
    await page.until_row(
        "k",
        3,
        lambda row: row[2] == "found, then edited" and "changing" not in row[3],
        "edit confirmed",
    )
    edits = [f for f in await page.tap("sent") if f["type"] == "edit"]
    assert len(edits) == 2 and {f["cid"] for f in edits} == {event["cid"]}, edits
    acks = [f for f in await page.tap("got") if f["type"] == "ack" and f["id"] == 4]
    assert [f.get("duplicate") for f in acks] == [True]

    assert await bob.drain_to_pong() == []  # no copy of anything
    rows = await page.messages("k")
    assert_once_in_order(rows, ["stored once", "resent once", "found, then edited"])


# -- protocol 1.1: read markers, unread counts and typing ---------------------------------

UNREAD = "return document.querySelector(`#rooms li[data-room=${arguments[0]}] .unread`).textContent"
TYPING = "return document.getElementById('typing').textContent"


async def until_unread(page: Page, room: str, count: str) -> None:
    await page.until(
        lambda d: d.execute_script(UNREAD, room) == count, f"{room} shows {count!r} unread"
    )


async def until_typing(page: Page, text: str) -> None:
    await page.until(lambda d: d.execute_script(TYPING) == text, f"typing line {text!r}")


async def reads_until(client: Any, room: str, id: int) -> list[int]:
    """The ids of the ``read`` frames ``client`` gets for ``room``, up to ``id``."""
    ids = []
    while True:
        got = await client.recv()
        if got["type"] != "read":
            continue
        assert got == {"type": "read", "room": room, "id": got["id"]}, got
        ids.append(got["id"])
        if got["id"] >= id:
            return ids


@ensure
async def test_unread_counts_come_from_the_server_and_events_never_count(server, browsers):
    bob = await connect(server.port, "bob")
    await bob.join("u")
    page = await open_page(browsers, server.port, "alice", preload=TAP)
    await page.join("side")  # first in the page's list: the room open after a reload
    await page.join("u")
    await page.call(page.driver.get, "about:blank")  # the page is closed
    # More than the backlog shows: the count cannot be the page's own.
    for i in range(1, 61):
        await bob.request({"type": "send", "room": "u", "body": f"n{i}"})

    await page.open("alice")
    await page.until_live("u")
    assert await page.script(UNREAD, "u") == "60"
    assert await page.script(UNREAD, "side") == ""
    joined = [f for f in await page.tap("got") if f["type"] == "joined" and f["room"] == "u"]
    assert [(f["last_read"], f["unread"]) for f in joined] == [(None, 60)]
    await page.until_shown("u", "n60")
    assert len(await page.messages("u")) == 50
    label = "return document.querySelector('#rooms .pick[data-room=u]').getAttribute('aria-label')"
    assert await page.script(label) == "u, 60 unread"

    # Live edits and deletes by others are no news; a new message is.
    await bob.request({"type": "edit", "room": "u", "id": 60, "body": "n60, edited"})  # 61
    await bob.request({"type": "delete", "room": "u", "id": 59})  # 62
    await page.until_row("u", 59, lambda row: "deleted" in row[3], "deleted live")
    await page.until_row("u", 60, lambda row: row[2] == "n60, edited", "edited live")
    assert await page.script(UNREAD, "u") == "60"
    await bob.request({"type": "send", "room": "u", "body": "one more"})  # 63
    await page.until_shown("u", "one more")
    await until_unread(page, "u", "61")
    # Nothing was marked read: the room was never open.
    assert [f for f in await page.tap("sent") if f["type"] == "read"] == []

    # After a reload the server counts again, without the deleted message.
    await page.reload("alice")
    await page.until_live("u")
    assert await page.script(UNREAD, "u") == "60"


@ensure
async def test_reading_the_open_room_marks_it_read(server, browsers):
    bob = await connect(server.port, "bob")
    await bob.join("m")
    page = await open_page(browsers, server.port, "alice", preload=TAP)
    await page.join("other")
    await page.join("m")  # open, and the tab visible
    assert await page.script("return document.visibilityState") == "visible"
    phone = await connect(server.port, "alice")  # another device of alice's
    await phone.join("m")
    for i in range(1, 4):
        await bob.request({"type": "send", "room": "m", "body": f"m{i}"})
    await page.until_shown("m", "m3")
    ids = await reads_until(phone, "m", 3)
    assert ids == sorted(set(ids)) and ids[-1] == 3, ids  # coalesced, only forward
    assert await page.script(UNREAD, "m") == ""
    sent = [f for f in await page.tap("sent") if f["type"] == "read"]
    assert [f["id"] for f in sent] == ids and all(f["room"] == "m" for f in sent), sent
    # Her own message moves the marker too (it is the newest shown).
    await page.say("seen it")
    assert (await message_with(phone, "seen it"))["id"] == 4
    await reads_until(phone, "m", 4)

    # Opened again (on "other": "m" in the background), nothing is unread in "m".
    await page.reload("alice")
    await page.until_live("m")
    assert await page.script("return document.getElementById('chat').dataset.room") == "other"
    assert await page.script(UNREAD, "m") == ""
    joined = [f for f in await page.tap("got") if f["type"] == "joined" and f["room"] == "m"]
    assert [(f["last_read"], f["unread"]) for f in joined] == [(4, 0)]
    # Still in the background, bob's next message is unread; opening the room reads it.
    await bob.request({"type": "send", "room": "m", "body": "m5"})
    await until_unread(page, "m", "1")
    await page.call(
        lambda: page.driver.find_element(By.CSS_SELECTOR, "#rooms .pick[data-room=m]").click()
    )
    await until_unread(page, "m", "")
    await reads_until(phone, "m", 5)


@ensure
async def test_a_read_from_another_device_clears_the_count(server, browsers):
    bob = await connect(server.port, "bob")
    await bob.join("d")
    page = await open_page(browsers, server.port, "alice", preload=TAP)
    await page.join("d")
    await page.join("side")  # "d" in the background
    phone = await connect(server.port, "alice")
    await phone.join("d")
    for body in ("x1", "x2"):
        await bob.request({"type": "send", "room": "d", "body": body})
    await page.until_shown("d", "x2")
    await until_unread(page, "d", "2")

    assert (await phone.request({"type": "read", "room": "d", "id": 1}))["id"] == 1
    await until_unread(page, "d", "1")  # x2 is still unread
    assert (await phone.request({"type": "read", "room": "d", "id": 2}))["id"] == 2
    await until_unread(page, "d", "")
    got = [f for f in await page.tap("got") if f["type"] == "read"]
    assert got == [{"type": "read", "room": "d", "id": i} for i in (1, 2)], got
    assert [f for f in await page.tap("sent") if f["type"] == "read"] == []
    assert len(await page.messages("d")) == 2  # nothing else rendered


@ensure
async def test_typing_goes_both_ways_and_ends_with_the_message(server, browsers, tmp_path):
    bob, carol = await in_room(server.port, "t", "bob", "carol")
    page = await open_page(browsers, server.port, "alice", preload=TAP)
    await page.join("t")

    await page.call(lambda: page.driver.find_element(By.ID, "message").send_keys("hel"))
    while (got := await bob.recv())["type"] != "typing":
        pass
    assert got == {"type": "typing", "room": "t", "user": "alice"}
    typing = [f for f in await page.tap("sent") if f["type"] == "typing"]
    assert typing and all(f["room"] == "t" for f in typing), typing
    # Enter sends the message, not another typing frame.
    before = len(typing)
    await page.call(lambda: page.driver.find_element(By.ID, "message").send_keys(Keys.ENTER))
    await page.until_shown("t", "hel")
    assert len([f for f in await page.tap("sent") if f["type"] == "typing"]) == before

    live = "return document.getElementById('typing').getAttribute('aria-live')"
    assert await page.script(live) == "polite"
    assert await page.script(TYPING) == ""
    bob.send({"type": "typing", "room": "t"})
    await until_typing(page, "bob is typing…")
    carol.send({"type": "typing", "room": "t"})
    await until_typing(page, "bob and carol are typing…")
    await page.call(page.driver.set_window_size, 390, 800)  # a phone
    assert await page.call(page.driver.find_element(By.ID, "typing").is_displayed)
    fits = await page.script("return document.documentElement.scrollWidth <= window.innerWidth")
    assert fits
    await page.screenshot(tmp_path, "typing-phone.png")
    # Bob's message ends his line at once; carol's fades out with no new frame.
    await bob.request({"type": "send", "room": "t", "body": "done typing"})
    await page.until_shown("t", "done typing")
    await until_typing(page, "carol is typing…")
    await until_typing(page, "")


# -- protocol 1.1: presence ---------------------------------------------------------------

# The open room's presence as the page shows it: [the toggle's text, or None when
# nothing is shown; whether the list is open; its items, "name [class]" if classed].
ONLINE = """
const toggle = document.getElementById('presence-toggle');
return [document.getElementById('presence').hidden
          ? null : document.getElementById('online-count').textContent,
        toggle.getAttribute('aria-expanded') === 'true'
          && !document.getElementById('online-panel').hidden,
        [...document.querySelectorAll('#online-list li')]
          .map((li) => li.className ? `${li.textContent} [${li.className}]` : li.textContent)];
"""


async def until_online(page: Page, text: str | None, items: list[str] | None = None) -> list[Any]:
    """Wait until the open room shows ``text`` ("3 online"; None: nothing) and, if
    ``items`` is given, its list is open and holds exactly those."""

    def ok(driver: Any) -> Any:
        shown = driver.execute_script(ONLINE)
        if shown[0] != text or (items is not None and (not shown[1] or shown[2] != items)):
            return False
        return shown

    return await page.until(ok, f"presence {text!r} {items!r}")


async def toggle_online(page: Page) -> None:
    await page.call(lambda: page.driver.find_element(By.ID, "presence-toggle").click())


def presence_frames(frames: list[dict], room: str) -> list[dict]:
    return [f for f in frames if f["type"] == "presence" and f.get("room") == room]


@ensure
async def test_presence_shows_who_is_online_and_follows_joins_and_leaves(
    server, browsers, tmp_path
):
    bob, carol = await in_room(server.port, "p", "bob", "carol")  # version 1 joins count too
    page = await open_page(browsers, server.port, "alice", preload=TAP)
    await page.join("p")
    await until_online(page, "3 online")
    joins = [f for f in await page.tap("sent") if f["type"] == "join"]
    assert [(f["room"], f["presence"]) for f in joins] == [("p", True)], joins
    joined = [f for f in await page.tap("got") if f["type"] == "joined"]
    assert [(f["online"], f["online_count"]) for f in joined] == [(["alice", "bob", "carol"], 3)]

    # From the keyboard: Enter opens the list, Escape closes it and keeps the focus.
    toggle = await page.call(page.driver.find_element, By.ID, "presence-toggle")
    assert await page.call(toggle.get_attribute, "aria-expanded") == "false"
    await page.call(toggle.send_keys, Keys.ENTER)
    everyone = ["alice [you]", "bob", "carol"]
    await until_online(page, "3 online", everyone)

    # Live, from events: dave's first connection enters, his second changes
    # nothing, the last one leaving takes him off; a leave (bob) as well.
    dave = await connect(server.port, "dave")
    await dave.join("p")
    await until_online(page, "4 online", [*everyone, "dave"])
    dave_too = await connect(server.port, "dave")
    await dave_too.join("p")
    await dave.close()
    await bob.request({"type": "leave", "room": "p"})
    await until_online(page, "3 online", ["alice [you]", "carol", "dave"])
    await dave_too.close()
    await until_online(page, "2 online", ["alice [you]", "carol"])
    events = [
        (f["user"], f["online"]) for f in presence_frames(await page.tap("got"), "p") if "user" in f
    ]
    assert events == [("dave", True), ("bob", False), ("dave", False)], events
    # Nothing of it in the message log, nor as an error.
    assert await page.messages("p") == []
    assert await page.call(page.driver.find_elements, By.CSS_SELECTOR, "#errors li") == []

    await page.call(lambda: page.driver.switch_to.active_element.send_keys(Keys.ESCAPE))
    await until_online(page, "2 online")
    assert (await page.script(ONLINE))[1] is False
    assert await page.script("return document.activeElement.id") == "presence-toggle"

    # Per room: one of her own shows 1; back in "p", 2 again.
    await page.join("q")
    await until_online(page, "1 online")
    await page.call(
        lambda: page.driver.find_element(By.CSS_SELECTOR, "#rooms .pick[data-room=p]").click()
    )
    await until_online(page, "2 online")

    # After a reconnect both rooms are joined again with presence, and the list is fresh.
    await page.script("window.__tap.socket.close()")

    def rejoined(driver: Any) -> Any:
        sent = driver.execute_script("return window.__tap.sent")
        return len([f for f in sent if f["type"] == "join"]) == 4

    await page.until(rejoined, "both rooms joined again")
    await page.until_live("p")
    await page.until_live("q")
    await until_online(page, "2 online")
    joins = [f for f in await page.tap("sent") if f["type"] == "join"]
    assert sorted((f["room"], f["presence"]) for f in joins) == [
        ("p", True),
        ("p", True),
        ("q", True),
        ("q", True),
    ], joins

    # A phone: the count is in the header, the list opens over the messages and
    # fits; a tap elsewhere closes it.
    await page.call(page.driver.set_window_size, 390, 800)
    assert await page.call(toggle.is_displayed)
    await toggle_online(page)
    await until_online(page, "2 online", ["alice [you]", "carol"])
    assert await page.call(page.driver.find_element(By.ID, "online-list").is_displayed)
    fits = await page.script("return document.documentElement.scrollWidth <= window.innerWidth")
    assert fits
    await page.screenshot(tmp_path, "presence-phone.png")
    await page.call(lambda: page.driver.find_element(By.ID, "messages").click())
    await until_online(page, "2 online")
    assert (await page.script(ONLINE))[1] is False
    await carol.close()


@ensure
async def test_a_partial_list_says_and_n_more_and_events_keep_the_count(
    make_server, browsers, tmp_path
):
    server = make_server(presence_list_max=1)
    bob, carol = await in_room(server.port, "big", "bob", "carol")
    page = await open_page(browsers, server.port, "alice", preload=TAP)
    await page.join("big")
    joined = [f for f in await page.tap("got") if f["type"] == "joined"]
    assert [(f["online"], f["online_count"]) for f in joined] == [(["alice"], 3)]
    await until_online(page, "3 online")
    await toggle_online(page)
    await until_online(page, "3 online", ["alice [you]", "and 2 more [more]"])
    await page.screenshot(tmp_path, "presence-partial.png")

    dave = await connect(server.port, "dave")
    await dave.join("big")  # not listed before: added
    await until_online(page, "4 online", ["alice [you]", "dave", "and 2 more [more]"])
    await bob.close()  # never listed: one less of the rest
    await until_online(page, "3 online", ["alice [you]", "dave", "and 1 more [more]"])
    await dave.close()  # listed: removed
    await until_online(page, "2 online", ["alice [you]", "and 1 more [more]"])
    await carol.close()
    await until_online(page, "1 online", ["alice [you]"])


@ensure
async def test_unavailable_presence_shows_nothing_until_a_list_comes(server, browsers):
    (bob,) = await in_room(server.port, "n", "bob")
    page = await open_page(browsers, server.port, "alice", preload=TAP)
    # The join's answer says what a server with its presence state away says.
    await page.script(
        "window.__tap.incoming = (frame) => frame.type === 'joined'"
        " ? {...frame, online: null, online_count: null} : frame;"
    )
    await page.join("n")
    assert (await page.script(ONLINE))[0] is None
    dave = await connect(server.port, "dave")
    await dave.join("n")

    def event_came(driver: Any) -> Any:
        frames = presence_frames(driver.execute_script("return window.__tap.got"), "n")
        return [f for f in frames if f.get("user") == "dave"]

    await page.until(event_came, "dave's presence event")
    # An event alone cannot make a count: still nothing shown.
    assert (await page.script(ONLINE))[0] is None
    # The open room asks again (later, quietly), and shows what the answer says.
    await until_online(page, "3 online")
    asked = [f for f in await page.tap("sent") if f["type"] == "presence"]
    assert [f["room"] for f in asked] == ["n"], asked
    assert await page.call(page.driver.find_elements, By.CSS_SELECTOR, "#errors li") == []
    await dave.close()
    await until_online(page, "2 online")
    await bob.close()


@ensure
async def test_a_burst_list_replaces_what_the_page_knew(make_server, browsers):
    server = make_server(presence_burst=1)
    page = await open_page(browsers, server.port, "alice", preload=TAP)
    await page.join("b")
    await until_online(page, "1 online")
    # A name the page believes online though nobody is (as after a lost event);
    # events cannot take it away, a list does.
    await page.script(
        "window.__tap.socket.onmessage({data: JSON.stringify("
        "{type: 'presence', room: 'b', user: 'ghost', online: true})});"
    )
    await toggle_online(page)
    await until_online(page, "2 online", ["alice [you]", "ghost"])

    users = [f"m{i}" for i in range(1, 6)]
    clients = [await connect(server.port, user) for user in users]
    # At once: past one event a second, the rest come as one list at its end.
    await gatherResults([Deferred.fromCoroutine(c.join("b")) for c in clients])
    await until_online(page, "6 online", ["alice [you]", *users])
    frames = presence_frames(await page.tap("got"), "b")
    lists = [f for f in frames if "online_count" in f]
    assert lists and all("ref" not in f for f in lists), frames
    assert len([f for f in frames if "user" in f]) < 1 + len(users), frames
    assert await page.messages("b") == []
    for client in clients:
        await client.close()
    await until_online(page, "1 online", ["alice [you]"])
