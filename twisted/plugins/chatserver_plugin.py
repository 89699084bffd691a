"""twistd plugin: ``twistd -n chatserver``. Heavy imports wait for makeService.

With ``workers = 1`` the twistd process is the server. With more, it is the
supervisor of that many worker processes serving the same ports
(``chatserver.workers``); endpoints that cannot be shared are refused here,
before anything starts.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService, IServiceMaker
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
            if self.config.workers > 1:
                from chatserver.workers.listen import NotShareable, check_shareable

                for setting, description in endpoint_settings(self.config):
                    try:
                        check_shareable(setting, description)
                    except NotShareable as e:
                        raise ConfigError(str(e)) from None
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def endpoint_settings(config: Any) -> list[tuple[str, str]]:
    """Every (setting, endpoint string) the server listens on."""
    return [
        (setting, description)
        for setting in ("listen", "metrics_listen", "admin_listen")
        for description in getattr(config, setting)
    ]


@implementer(IServiceMaker, IPlugin)
class ChatServerMaker:
    tapname = "chatserver"
    description = "Real-time chat server (WebSocket, Redis fan-out, SQL storage)."
    options = Options

    def makeService(self, options: Options) -> IService:
        from twisted.internet import reactor

        if options.config.workers > 1:
            return self._supervisor(options, reactor)

        from twisted.logger import Logger

        from chatserver.broker.redis import RedisTLSUnavailable as StartupRefused
        from chatserver.gcstats import freeze_startup_objects
        from chatserver.service import ChatServerService
        from chatserver.store import SchemaError
        from chatserver.workers.process import raise_open_files_limit, stop_cleanly_on_signals

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

    def _supervisor(self, options: Options, reactor: Any) -> IService:
        """The parent of the workers. It reserves the ports and runs the same
        blocking schema check as a single server (one connection, closed at
        once), so a port that is taken or a database that is missing stops the
        start with a one-line message instead of every worker failing in a
        restart loop."""
        from chatserver.store import SchemaError
        from chatserver.store.open import prepare
        from chatserver.workers.listen import reserve
        from chatserver.workers.process import stop_cleanly_on_signals
        from chatserver.workers.supervisor import Supervisor

        config = options.config
        reservation = reserve(
            reactor, endpoint_settings(config), lambda message: SystemExit(f"chatserver: {message}")
        )
        try:
            prepare(config)
        except SchemaError as e:
            reservation.close()
            raise SystemExit(f"chatserver: {e}") from None
        reactor.callWhenRunning(stop_cleanly_on_signals, reactor)
        return Supervisor(config, reactor, reservation)


serviceMaker = ChatServerMaker()
