"""The one door to the libraries' private parts.

chatserver is fast because a few paths skip a library's public API: writing
straight to the socket (Twisted), reading small WebSocket frames itself and
keeping idle connections small (Autobahn), slicing Redis replies out of a read
(txredisapi). Each such shortcut lives in a module of this package, named for
the library it reaches into, and nowhere else. At start-up every shortcut
checks that what it relies on is still there with the expected shape; when it
is not (a newer release renamed something), one warning names what is missing
and the server takes the library's public path instead: correct, only slower.
``fast_paths = false`` takes the public path everywhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from twisted.logger import Logger

log = Logger()

# A check returns the names it found missing or changed; empty means usable.
Check = Callable[[], list[str]]


class FastPaths:
    """Which shortcuts this server takes, decided once at start-up, and how often each ran.

    ``runs`` is counted by the shortcuts themselves (one integer increment on
    their own path), so a test, and /metrics, can tell that a shortcut really
    ran rather than always falling back.
    """

    def __init__(self, wanted: bool, checks: dict[str, Check] | None = None) -> None:
        self.wanted = wanted
        self.enabled: dict[str, bool] = {}
        self.missing: dict[str, list[str]] = {}
        self.runs: Counter[str] = Counter()
        for name, check in (checks if checks is not None else all_checks()).items():
            self.add(name, check)

    def add(self, name: str, check: Check) -> bool:
        """Decide one shortcut: on if wanted and its check passes."""
        missing = check() if self.wanted else []
        self.missing[name] = missing
        self.enabled[name] = self.wanted and not missing
        if missing:
            log.warn(
                "fast path {name} is off: the installed library lacks {missing};"
                " using its public API (correct, slower)",
                name=name,
                missing=", ".join(missing),
            )
        return self.enabled[name]

    def on(self, name: str) -> bool:
        return self.enabled.get(name, False)

    def names(self) -> Iterable[str]:
        return self.enabled.keys()


def all_checks() -> dict[str, Check]:
    """Every shortcut of every library module (imported here, not at import time)."""
    from chatserver.compat import autobahn, twisted, txredisapi

    return {**twisted.CHECKS, **autobahn.CHECKS, **txredisapi.CHECKS}


def missing_attributes(owner: object, names: Iterable[str], label: str) -> list[str]:
    """The names ``owner`` lacks, spelled as ``label.name`` for the warning."""
    return [f"{label}.{name}" for name in names if not hasattr(owner, name)]
