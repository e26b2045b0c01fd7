"""What `extensions.freshness` costs a query (infrastructure.web.freshness).

One service over a temporary folder (a few products, projected), and two schemas over it:
the same extensions, with and without Freshness. Each document goes through each schema,
call by call alternately, in rounds, through `schema.execute` (no HTTP: the difference is the
extension, and HTTP would only add noise); each round's figure is the median of its
calls, and the table gives the medians over the rounds, their difference and ratio. `Freshness.now()`
alone is timed too. The claim under test: the extension reads memory only, so its cost is
a few microseconds, a small share of the cheapest query that reads the read models.
"""

import statistics
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.common import BenchmarkError, accepted, measured
from orderstream.bootstrap import Service
from orderstream.commands.product import AddProduct
from orderstream.infrastructure.security.auth import Actor
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.freshness import Freshness
from orderstream.infrastructure.web.limits import QueryBounds, QueryLimits
from orderstream.schema.app import build_schema
from orderstream.schema.context import Context

NAME = "freshness"
DOCUMENTS = {
    "products(first: 5)": "{ products(first: 5) { edges { node { sku name } } } }",
    "{ __typename }": "{ __typename }",  # no read at all: the extension's share at its largest
}


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
        # Bounds of their own: the verdicts they keep hold for one schema.
        schemas = {"without": build_schema(QueryBounds(QueryLimits())),
                   "with": build_schema(QueryBounds(QueryLimits()), freshness=freshness)}
        context = Context(dispatcher=service.dispatcher, store=service.store, read=service.read, order_lines=None,
                          hub=service.hub, owners=service.owners, correlation_id="bench", verified_actor=staff)

        async def call(schema, document: str) -> float:
            started = time.perf_counter()
            result = await schema.execute(document, context_value=context)
            elapsed = time.perf_counter() - started
            if result.errors:
                raise BenchmarkError(f"{document}: {result.errors}")
            return elapsed

        for schema in schemas.values():  # parse, validate and warm up both
            for document in DOCUMENTS.values():
                for _ in range(50):
                    await call(schema, document)
        rounds: list[dict[str, float]] = []
        for _ in range(sizes.rounds):
            figures = {}
            for name, document in DOCUMENTS.items():
                times: dict[str, list[float]] = {"without": [], "with": []}
                # Call by call, who goes first alternating: the machine's drift favours neither.
                for number in range(sizes.calls):
                    for label in ("without", "with") if number % 2 == 0 else ("with", "without"):
                        times[label].append(await call(schemas[label], document))
                figures.update({f"{name} {label}": statistics.median(values) * 1e6 for label, values in times.items()})
            rounds.append(figures)
        started = time.perf_counter()
        for _ in range(100_000):
            freshness.now()
        now_us = (time.perf_counter() - started) / 100_000 * 1e6
    finally:
        await service.close()
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    return {"median_us": median, "freshness_now_us": now_us}


def table(report: dict[str, Any]) -> str:
    median = report["median_us"]
    others = report["other_processes_cpu_cores"]
    busy = f"; other processes used {others:.1f} cores" if others is not None else ""
    lines = [f"freshness ({report['sizes']['rounds']} rounds of {report['sizes']['calls']} calls each{busy}; "
             "medians of the rounds' medians)"]
    for name in DOCUMENTS:
        without, with_ = median[f"{name} without"], median[f"{name} with"]
        lines.append(f"  {name:<20} without {without:8.1f} µs, with {with_:8.1f} µs: "
                     f"{with_ - without:+7.1f} µs, ratio {with_ / without:.3f}")
    lines.append(f"  Freshness.now() alone {report['freshness_now_us']:.2f} µs")
    return "\n".join(lines) + "\n"
