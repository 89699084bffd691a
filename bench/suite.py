"""The fan-out benchmark suite: chatserver beside its peers, rate stepped up.

For each server (chatserver with Postgres and Redis on, the bare Autobahn
broadcast peer, the Node.js ``ws`` peer) it runs ``cross_instance.py`` at
rising message rates on the 10 rooms x 100 members shape, one sender per
room, and reports per server the highest deliveries/s that kept every
delivery (0 lost) with p99 under 50 ms (interactive) and under 250 ms (bulk)
at that step and every step below it, plus every run's row. A step that
would end a series runs once more (``--retries``) and the series goes on if
that run passes: on a shared VM a single hiccup otherwise decides the result.
Stepping stops for a server once a run loses deliveries or its p99 passes a
second.

    python bench/suite.py [--servers chatserver,autobahn,node] [--rates 100,200,...]

Each run prints whether the load generator, not the server, ran out of CPU
(``gen%`` at 90 or more): such a row is a floor for the server, not its limit.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_RATES = (
    "100,200,400,600,800,1000,1200,1600,2000,2400,2800,3200,4000,5000,6000,8000,10000,"
    "12000,16000,20000,24000"
)
GENERATOR_BOUND = 90.0
GENERATORS: set[str] = set()  # which generator ran, as cross_instance.py reports it


def run_one(server: str, rate: int, seconds: float) -> dict[str, float] | None:
    argv = [
        sys.executable,
        str(HERE / "cross_instance.py"),
        "--server",
        server,
        "--instances",
        "1",
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        "--drain",
        "5",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    out = done.stdout

    def grab(pattern: str) -> str | None:
        found = re.search(pattern, out)
        return found.group(1) if found else None

    delivered = grab(r"\| deliveries/s \(arriving in the window\) \| (\d+) \|")
    latency = grab(r"\| latency p50 / p90 / p99 / max \(ms\) \| ([^|]+) \|")
    lost = grab(r"\| lost \| (\d+) ")
    gen = grab(r"\| generator CPU \(% of one core\) \| (\d+)%")
    cpu = grab(r"\| server A CPU \(senders\) \| (\d+)%")
    if None in (delivered, latency, lost, gen, cpu):
        sys.stderr.write(f"{server} at {rate}/s: no result\n{out[-2000:]}\n{done.stderr[-2000:]}\n")
        return None
    p50, _, p99, _ = (float(v) for v in latency.split(" / "))
    GENERATORS.add(grab(r"generator: (members [^\n]+)") or "unknown")
    return {
        "rate": rate,
        "deliveries": float(delivered),
        "p50": p50,
        "p99": p99,
        "lost": float(lost),
        "gen": float(gen),
        "cpu": float(cpu),
    }


def passes(row: dict[str, float], bound: float) -> bool:
    return row["lost"] == 0 and row["p99"] < bound


def print_row(server: str, rate: int, row: dict[str, float], retry: bool = False) -> None:
    print(
        f"| {server}{' (again)' if retry else ''} | {rate} | {row['deliveries']:.0f} |"
        f" {row['p50']:.1f} | {row['p99']:.1f} | {row['lost']:.0f} | {row['cpu']:.0f} |"
        f" {row['gen']:.0f} |",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="chatserver,autobahn,node")
    parser.add_argument("--rates", default=DEFAULT_RATES, help="messages/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured window per run")
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="runs more of a step that would end a series (0: the first result stands)",
    )
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    summary = []
    print("| server | sent/s | deliveries/s | p50 ms | p99 ms | lost | server CPU % | gen % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for server in args.servers.split(","):
        # Per bound: the last step of an unbroken run of passing steps from the
        # lowest rate; one noisy pass above a failed step doesn't count.
        best = {50.0: (0.0, 0.0), 250.0: (0.0, 0.0)}
        broken: set[float] = set()
        for rate in rates:
            row = run_one(server, rate, args.seconds)
            if row is None:
                break
            print_row(server, rate, row)
            breaks = [b for b in best if b not in broken and not passes(row, b)]
            for _ in range(args.retries if breaks else 0):
                # One hiccup of a shared VM should not end a series: the step runs
                # again, and the series goes on if the new run passes.
                again = run_one(server, rate, args.seconds)
                if again is None:
                    break
                print_row(server, rate, again, retry=True)
                row = again
                if all(passes(row, b) for b in breaks):
                    break
            for bound in best:
                if bound in broken:
                    continue
                if passes(row, bound):
                    best[bound] = (row["deliveries"], row["gen"])
                else:
                    broken.add(bound)
            if row["lost"] > 0 or row["p99"] > 1000:
                break
        summary.append((server, best[50.0], best[250.0]))
    print()
    print("| server | deliveries/s, 0 lost, p99 < 50 ms | deliveries/s, 0 lost, p99 < 250 ms |")
    print("|---|---:|---:|")

    def cell(result: tuple[float, float]) -> str:
        deliveries, gen = result
        return f"{deliveries:,.0f}{' *' if gen >= GENERATOR_BOUND else ''}"

    for server, interactive, bulk in summary:
        print(f"| {server} | {cell(interactive)} | {cell(bulk)} |")
    print()
    print(
        "Each figure is the last step of an unbroken series of passing steps"
        f" (a step that broke it ran up to {args.retries} more time(s); the last run counts). "
        f"* the generator was at {GENERATOR_BOUND:.0f}% or more of its core in that step: "
        "a floor for the server, not its limit."
        f" Generator: {'; '.join(sorted(GENERATORS)) or '-'}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
