"""What `extensions.freshness` costs a query (infrastructure.web.freshness).

One service over a temporary folder (a few products, projected), and two schemas over it:
the same extensions, with and without Freshness. A query of five products goes through
each, alternately, in rounds, through `schema.execute` (no HTTP: the difference is the
extension, and HTTP would only add noise); each round's figure is the median of its
calls, and the table gives the medians over the rounds and their ratio. `Freshness.now()`
alone is timed too. The claim under test: the extension reads memory only, so its cost is
a few microseconds, a small share of the cheapest query that reads the read models.
"""

import statistics
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.common import accepted, measured
from orderstream.bootstrap import Service
from orderstream.commands.product import AddProduct
from orderstream.infrastructure.security.auth import Actor
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.freshness import Freshness
from orderstream.infrastructure.web.limits import QueryBounds, QueryLimits
from orderstream.schema.app import build_schema

NAME = "freshness"
QUERY = "{ products(first: 5) { edges { node { sku name } } } }"


@dataclass(frozen=True)
class Sizes:
    rounds: int
    calls: int


FULL = Sizes(rounds=10, calls=200)
QUICK = Sizes(rounds=4, calls=100)


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/freshness.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    service = Service(Settings.load(str(folder), environ={}))
    await service.open()
    try:
        staff = Actor(subject="bench", role="staff")
        for number in range(10):
            accepted(await service.dispatcher.execute(
                AddProduct(f"SKU-{number}", f"Product {number}", Decimal("9.99"), "EUR", 10), staff), "AddProduct")
        await service.projector.catch_up()
        freshness = Freshness(service.store, service.read, service.hub)
        bounds = QueryBounds(QueryLimits())
        schemas = {"without": build_schema(bounds), "with": build_schema(bounds, freshness=freshness)}

        async def call(schema) -> float:
            started = time.perf_counter()
            result = await schema.execute(QUERY, context_value=_Context(service))
            elapsed = time.perf_counter() - started
            if result.errors:
                raise RuntimeError(result.errors)
            return elapsed

        for schema in schemas.values():  # parse, validate and warm up both
            for _ in range(50):
                await call(schema)
        rounds: list[dict[str, float]] = []
        for number in range(sizes.rounds):
            order = ("without", "with") if number % 2 == 0 else ("with", "without")
            figures = {}
            for label in order:
                figures[f"{label}_us"] = statistics.median([await call(schemas[label])
                                                            for _ in range(sizes.calls)]) * 1e6
            rounds.append(figures)
        started = time.perf_counter()
        for _ in range(100_000):
            freshness.now()
        now_us = (time.perf_counter() - started) / 100_000 * 1e6
    finally:
        await service.close()
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    return {"query_us": median, "with_over_without": median["with_us"] / median["without_us"],
            "freshness_now_us": now_us}


class _Context:
    """What the products query reads: the read store."""

    def __init__(self, service: Service) -> None:
        self.read = service.read


def table(report: dict[str, Any]) -> str:
    query = report["query_us"]
    others = report["other_processes_cpu_cores"]
    busy = f"; other processes used {others:.1f} cores" if others is not None else ""
    return (f"freshness ({report['sizes']['rounds']} rounds of {report['sizes']['calls']} calls each{busy})\n"
            f"  products(first: 5) without freshness  {query['without_us']:8.1f} µs (median)\n"
            f"  products(first: 5) with freshness     {query['with_us']:8.1f} µs (median)\n"
            f"  ratio with / without                  {report['with_over_without']:8.3f}\n"
            f"  Freshness.now() alone                 {report['freshness_now_us']:8.2f} µs\n")
