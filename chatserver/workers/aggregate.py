"""One /metrics for the whole server: the Prometheus texts of all its processes, merged.

The rule: series with the same name and labels are **summed** -- counters,
and gauges that add up across processes (connections, rooms hosted, queue
depths, pool sizes: the total database connections, subscribed channels) --
except the gauges in ``MAX_GAUGES``, which are states, extremes or views of
something outside that every process sees alike, where a sum means nothing
(``chatserver_fast_path_enabled`` is 0/1 per process; the longest GC pause
and the last batch size are extremes; each worker sees the same Redis Cluster
masters); for those the **maximum** is reported. A new gauge that does not add
up across processes belongs in ``MAX_GAUGES``. ``chatserver_workers_reporting`` says how many
workers' numbers are in the sum, so a scrape that missed a worker (restarting,
or too slow to answer) shows it instead of silently reporting less.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

MAX_GAUGES = frozenset(
    {
        "chatserver_fast_path_enabled",
        "chatserver_gc_longest_pause_seconds",
        "chatserver_store_last_batch_size",
        "chatserver_redis_cluster_masters",
    }
)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def parse(text: bytes) -> list[Metric]:
    """One process's exposition; ValueError if it is not Prometheus text."""
    try:
        return list(text_string_to_metric_families(text.decode()))
    except (UnicodeDecodeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"not Prometheus text: {e}") from None


def merge(expositions: Iterable[list[Metric]], workers_reporting: int) -> bytes:
    """The text exposition of all parsed ``expositions`` combined by the rule above."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for exposition in expositions:
        for family in exposition:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            take_max = family.type == "gauge" and family.name in MAX_GAUGES
            series = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in series:
                    series[key] = sample.value
                elif take_max:
                    series[key] = max(series[key], sample.value)
                else:
                    series[key] += sample.value
    merged = []
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        merged.append(family)
    merged.append(
        GaugeMetricFamily(
            "chatserver_workers_reporting",
            "Workers whose numbers are in this scrape's sums.",
            value=workers_reporting,
        )
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged))
    return generate_latest(registry)
