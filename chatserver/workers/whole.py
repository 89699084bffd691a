"""/healthz, /readyz and /metrics for the whole server, answered by any one worker.

Outside, the server is one: a load balancer or Prometheus reaches whichever
worker the kernel picked, so that worker asks the others (and the supervisor)
over the private channel and answers for all of them, naming itself
(``worker``, ``pid``) so a reader knows who answered. A sibling that does not
answer within ``ANSWER_TIMEOUT`` is reported, never waited for.

- /healthz: 200 while this worker serves; ``connections`` is this worker's,
  ``connections_total`` the server's, ``each`` lists every worker.
- /readyz: 503 if any *running* worker is not ready or does not answer, naming
  it; a worker the supervisor knows is down (between a crash and its restart)
  is listed in ``down`` but does not fail readiness: the kernel sends new
  connections only to the workers that listen.
- /metrics: see ``chatserver.workers.aggregate`` for how series are combined.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList

from chatserver.workers import aggregate
from chatserver.workers.channel import Handler, ask, socket_path

# Longer than a worker's own readiness check (service.READY_TIMEOUT, 2 s).
ANSWER_TIMEOUT = 3.0
SUPERVISOR = "supervisor"


class LocalServer(Protocol):
    def health(self) -> tuple[int, dict[str, Any]]: ...

    def readiness(self) -> Awaitable[tuple[int, dict[str, Any]]]: ...

    def metrics_text(self) -> bytes: ...


def worker_name(index: int) -> str:
    return f"worker {index}"


class WholeServer:
    def __init__(
        self, local: LocalServer, reactor: Any, runtime_dir: str, index: int, count: int
    ) -> None:
        self._local = local
        self._reactor = reactor
        self._runtime_dir = runtime_dir
        self.index = index
        self.count = count

    def _me(self) -> dict[str, Any]:
        return {"worker": self.index, "pid": os.getpid()}

    # This worker's own answers, for its siblings.

    def handlers(self) -> dict[bytes, Handler]:
        async def metrics() -> bytes:
            return self._local.metrics_text()

        async def health() -> bytes:
            _, body = self._local.health()
            return json.dumps({**body, **self._me()}).encode()

        async def ready() -> bytes:
            code, body = await self._local.readiness()
            return json.dumps({**body, **self._me(), "ready": code == 200}).encode()

        return {b"metrics": metrics, b"health": health, b"ready": ready}

    # Asking the others.

    async def _gather(self, question: bytes) -> dict[str, bytes | Exception]:
        names = [worker_name(i) for i in range(1, self.count + 1) if i != self.index]
        names.append(SUPERVISOR)
        asks = [
            Deferred.fromCoroutine(
                ask(
                    self._reactor,
                    socket_path(self._runtime_dir, name),
                    question,
                    ANSWER_TIMEOUT,
                )
            )
            for name in names
        ]
        results = await DeferredList(asks, consumeErrors=True)
        return {
            name: value if ok else value.value
            for name, (ok, value) in zip(names, results, strict=True)
        }

    def _answers(self, raw: dict[str, bytes | Exception]) -> dict[str, dict[str, Any] | str]:
        """Each sibling's JSON answer, or why there is none."""
        out: dict[str, dict[str, Any] | str] = {}
        for name, value in raw.items():
            if isinstance(value, Exception):
                out[name] = _why(value)
                continue
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            out[name] = parsed if isinstance(parsed, dict) else "no answer"
        return out

    def _running(self, supervisor: dict[str, Any] | str) -> dict[int, bool] | None:
        """Which workers the supervisor has running; None if it did not say."""
        if not isinstance(supervisor, dict):
            return None
        workers = supervisor.get("workers")
        if not isinstance(workers, dict):
            return None
        return {int(i): bool(w.get("running")) for i, w in workers.items()}

    async def health(self) -> tuple[int, dict[str, Any]]:
        _, own = self._local.health()
        answers = self._answers(await self._gather(b"health"))
        running = self._running(answers.pop(SUPERVISOR))
        each = [{**self._me(), "connections": own.get("connections", 0)}]
        for name, answer in answers.items():
            index = int(name.split()[-1])
            if isinstance(answer, dict):
                each.append(
                    {
                        "worker": index,
                        "pid": answer.get("pid"),
                        "connections": answer.get("connections", 0),
                    }
                )
            else:
                each.append({"worker": index, "pid": None, "problem": answer})
        each.sort(key=lambda w: w["worker"])
        answered = sum(1 for w in each if w["pid"] is not None)
        return 200, {
            **own,
            **self._me(),
            "workers": self.count,
            "workers_running": sum(running.values()) if running is not None else answered,
            "connections_total": sum(w.get("connections", 0) for w in each),
            "each": each,
        }

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        own_code, own = await self._local.readiness()
        answers = self._answers(await self._gather(b"ready"))
        running = self._running(answers.pop(SUPERVISOR))
        problems: dict[int, list[str]] = {}
        down: list[int] = []
        if own_code != 200:
            problems[self.index] = list(own.get("problems", ["not ready"]))
        for name, answer in answers.items():
            index = int(name.split()[-1])
            if isinstance(answer, dict):
                if not answer.get("ready"):
                    problems[index] = list(answer.get("problems", ["not ready"]))
            elif running is not None and not running.get(index, False):
                down.append(index)
            else:
                problems[index] = [answer]
        body: dict[str, Any] = {"ready": not problems, **self._me(), "workers": self.count}
        if problems:
            body["not_ready"] = sorted(problems)
            body["problems"] = [
                f"{worker_name(i)}: {p}" for i in sorted(problems) for p in problems[i]
            ]
        if down:
            body["down"] = sorted(down)
        return (200 if not problems else 503), body

    async def metrics(self) -> bytes:
        raw = await self._gather(b"metrics")
        expositions = [aggregate.parse(self._local.metrics_text())]
        reporting = 1
        for name, value in raw.items():
            if isinstance(value, Exception):
                continue
            try:
                expositions.append(aggregate.parse(value))
            except ValueError:
                continue
            if name != SUPERVISOR:
                reporting += 1
        return aggregate.merge(expositions, reporting)


def _why(error: Exception) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {ANSWER_TIMEOUT:g}s"
    return f"unreachable ({type(error).__name__})"
