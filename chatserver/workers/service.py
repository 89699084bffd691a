"""One worker's service tree: its end of the private channel, then a full chat server."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort

from chatserver.service import ChatServerService
from chatserver.workers import channel
from chatserver.workers.listen import shared_endpoint
from chatserver.workers.spec import WorkerSpec
from chatserver.workers.whole import WholeServer


class ChannelService(Service):
    """Listens on this process's socket of the private channel while it runs."""

    def __init__(self, reactor: Any, path: str, factory: channel.ChannelFactory) -> None:
        self._reactor = reactor
        self.path = path
        self._factory = factory
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        if self._port is None:
            self._port = channel.listen(self._reactor, self.path, self._factory)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._port = channel.listen(self._reactor, self.path, self._factory)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self._port = self._port, None
        return port.stopListening() if port is not None else None


class WorkerService(MultiService):
    """The channel starts first and stops last: while the chat server drains,
    its siblings can still ask it how it is (not ready: draining)."""

    def __init__(self, spec: WorkerSpec, reactor: Any) -> None:
        super().__init__()
        self.spec = spec

        def endpoint(description: str) -> Any:
            return shared_endpoint(reactor, description, spec.ports.get(description))

        def whole(local: Any) -> WholeServer:
            return WholeServer(local, reactor, spec.runtime_dir, spec.index, spec.count)

        self.chat = ChatServerService(spec.config, reactor, endpoint=endpoint, whole=whole)
        assert self.chat.whole is not None
        path = channel.socket_path(spec.runtime_dir, spec.name)
        factory = channel.ChannelFactory(reactor, self.chat.whole.handlers())
        self.channel = ChannelService(reactor, path, factory)
        self.channel.setServiceParent(self)
        self.chat.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # not MultiService's: that stops all children at once
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.chat.stopService()
        await maybeDeferred(self.channel.stopService)
