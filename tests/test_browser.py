"""The web page at / in a real headless Chromium, driven by Selenium, against real servers.

Selenium blocks, and the servers run on this process's reactor: every browser
call runs in a thread (``deferToThread``) so the reactor keeps serving. Waits
are explicit (``WebDriverWait`` on a condition), never fixed sleeps. Debian's
/usr/bin/chromium and /usr/bin/chromedriver are used as they are: Selenium
downloads nothing, and a machine without them fails these tests (tests/run
installs them).
"""

from __future__ import annotations

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
from selenium.webdriver.support.ui import WebDriverWait
from twisted.internet.threads import deferToThread
from wsclient import connect, handshake_status

ensure = pytest_twisted.ensureDeferred
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"
WAIT = 20.0
SECRET = "test-secret-that-is-long-enough-for-hs256"

# Every message of a room as the page shows it: [id or None, user, body, classes].
READ_ROOM = """
return [...document.querySelectorAll('#messages li.msg')]
  .filter((li) => li.dataset.room === arguments[0])
  .map((li) => [li.dataset.id === undefined ? null : Number(li.dataset.id),
                li.querySelector('.user').textContent,
                li.querySelector('.body').textContent,
                li.className]);
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
            self.driver.find_element(By.ID, "name").send_keys(user)
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

    async def messages(self, room: str) -> list[list[Any]]:
        return await self.script(READ_ROOM, room)

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


async def open_page(browsers: Any, port: int, user: str | None = None, **kw: Any) -> Page:
    page = Page(await deferToThread(browsers), port)
    await page.open(user, **kw)
    return page


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
