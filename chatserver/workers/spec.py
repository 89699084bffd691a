"""What the supervisor tells a worker: the validated config and the worker's place.

It travels as one JSON line on the worker's stdin, not in the environment or
on the command line: the config holds secrets (jwt_secret, admin_api_key, the
database password), and a process's environment and arguments are readable
by others (ps, /proc). The worker rebuilds the frozen ``Config`` from the
fields, so it is validated again, by the same code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from chatserver.config import SETTINGS, Config

MAX_SPEC_BYTES = 1 << 20


class SpecError(ValueError):
    """The supervisor's line could not be read as a worker spec."""


def config_to_json(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def config_from_json(fields: dict[str, Any]) -> Config:
    values = {}
    for name, value in fields.items():
        if name not in SETTINGS:
            raise SpecError(f"unknown setting {name!r}")
        if SETTINGS[name].type == "tuple[str, ...]":
            value = tuple(value)
        values[name] = value
    return Config(**values)


@dataclass(frozen=True)
class WorkerSpec:
    config: Config
    index: int  # 1..count
    count: int
    runtime_dir: str  # the private channel's sockets (0700, made by the supervisor)
    parent_pid: int
    ports: dict[str, int] = field(default_factory=dict)  # reserved: description -> port
    reactor: str | None = None  # module of the supervisor's reactor, to use the same kind

    @property
    def name(self) -> str:
        return f"worker {self.index}"

    def to_line(self) -> bytes:
        data = {
            "config": config_to_json(self.config),
            "index": self.index,
            "count": self.count,
            "runtime_dir": self.runtime_dir,
            "parent_pid": self.parent_pid,
            "ports": self.ports,
            "reactor": self.reactor,
        }
        return json.dumps(data).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> WorkerSpec:
        if len(line) > MAX_SPEC_BYTES or not line.endswith(b"\n"):
            raise SpecError("no complete spec line from the supervisor")
        try:
            data = json.loads(line)
            return cls(
                config=config_from_json(data["config"]),
                index=int(data["index"]),
                count=int(data["count"]),
                runtime_dir=str(data["runtime_dir"]),
                parent_pid=int(data["parent_pid"]),
                ports={str(k): int(v) for k, v in data["ports"].items()},
                reactor=data.get("reactor"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SpecError(f"bad spec from the supervisor: {e}") from None
