"""twistd plugin: ``twistd -n chatserver``. Heavy imports wait for makeService."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IServiceMaker, MultiService
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


def _settings() -> list[tuple[str, str]]:
    from chatserver.config import describe

    return describe()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Real-time chat server: WebSocket at /ws, health at /healthz. Each setting can also "
        "come from the --config TOML file or a CHATSERVER_<SETTING> environment variable; "
        "the command line wins over the environment, which wins over the file."
    )
    optParameters = [["config", "c", None, "TOML configuration file."]] + [
        [name.replace("_", "-"), None, None, doc] for name, doc in _settings() if name != "listen"
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:8080 or systemd:domain=INET:index=0 (repeatable)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        from chatserver.config import SETTINGS, ConfigError, load

        overrides = {
            name: self.get(name.replace("_", "-")) for name in SETTINGS if name != "listen"
        }
        overrides["listen"] = self["listen"] or None
        try:
            self.config = load(self["config"], os.environ, overrides)
            from twisted.internet import reactor

            from chatserver.service import parse_endpoint

            for description in self.config.listen:
                try:
                    parse_endpoint(reactor, description)
                except Exception as e:
                    raise ConfigError(f"listen = {description!r}: {e}") from None
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def raise_open_files_limit() -> None:
    """Each WebSocket is a file descriptor, and the usual soft limit is 1024.

    Raise the soft limit to the hard one (always allowed); a hard limit below
    what a deployment needs is the operator's to raise (systemd: LimitNOFILE).
    """
    import resource

    from twisted.logger import Logger

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return
    Logger().info(
        "open files limit: {limit} (about that many connections)",
        limit="unlimited" if hard == resource.RLIM_INFINITY else hard,
    )


def stop_cleanly_on_signals(reactor: Any) -> None:
    """SIGTERM and SIGINT stop the reactor like Twisted's own handlers (the service
    drains its clients), but are not re-raised when twistd exits: a server that
    drained has done its job and exits 0, which is what systemd and container
    runtimes expect from a clean stop. Runs after the reactor installed its
    handlers, and replaces them."""
    import signal

    def stop(number: int, frame: Any) -> None:
        reactor.callFromThread(reactor.stop)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, stop)


@implementer(IServiceMaker, IPlugin)
class ChatServerMaker:
    tapname = "chatserver"
    description = "Real-time chat server (WebSocket, Redis fan-out, SQL storage)."
    options = Options

    def makeService(self, options: Options) -> MultiService:
        from twisted.internet import reactor
        from twisted.logger import Logger

        from chatserver.broker.redis import RedisTLSUnavailable as StartupRefused
        from chatserver.gcstats import freeze_startup_objects
        from chatserver.service import ChatServerService
        from chatserver.store import SchemaError

        def freeze() -> None:
            frozen = freeze_startup_objects()
            Logger().info(
                "{frozen} objects from start-up kept out of garbage collection", frozen=frozen
            )

        reactor.callWhenRunning(freeze)
        raise_open_files_limit()
        try:
            service = ChatServerService(options.config, reactor)
        except (SchemaError, StartupRefused) as e:
            raise SystemExit(f"chatserver: {e}") from None
        reactor.callWhenRunning(stop_cleanly_on_signals, reactor)
        return service


serviceMaker = ChatServerMaker()
