"""`orderstream seed-demo`: a shop through the command handlers, the same for the same seed."""

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import orderstream.cli

SMALL = ["--products", "6", "--customers", "5", "--orders", "60", "--days", "10"]


def seed(folder: Path, *extra: str) -> None:
    orderstream.cli.main(["seed-demo", "--data-dir", str(folder), *SMALL, *extra])


def rows(path: Path, query: str) -> list[tuple]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(query).fetchall()


def shop_without_ids(folder: Path) -> list[tuple]:
    """The read models as a client sees them, ids left out: what a seed decides."""
    read = folder / "read.db"
    return [*rows(read, "SELECT sku, name, price, currency, stock_available, stock_reserved FROM products "
                        "ORDER BY sku"),
            *rows(read, "SELECT country, locale FROM customers ORDER BY registered_at"),
            *rows(read, "SELECT status, total, currency, ship_name FROM orders ORDER BY placed_position")]


@pytest.mark.slow
def test_the_demo_shop_has_every_status_three_currencies_and_the_same_shop_for_the_same_seed(tmp_path):
    seed(tmp_path / "one", "--seed", "7")
    seed(tmp_path / "two", "--seed", "7")
    seed(tmp_path / "other", "--seed", "8")
    one = tmp_path / "one"

    statuses = dict(rows(one / "read.db", "SELECT status, count(*) FROM orders GROUP BY status"))
    assert set(statuses) == {"PENDING", "PAID", "SHIPPED", "DELIVERED", "CANCELLED"} and sum(statuses.values()) == 60
    assert {currency for (currency,) in rows(one / "read.db", "SELECT DISTINCT currency FROM products")} == \
        {"EUR", "USD", "GBP"}
    # The projections have applied the whole log: what serve would show at once.
    head = rows(one / "events.db", "SELECT max(position) FROM events")[0][0]
    assert {position for (position,) in rows(one / "read.db", "SELECT position FROM projection_checkpoints")} == {head}

    assert shop_without_ids(one) == shop_without_ids(tmp_path / "two")
    assert shop_without_ids(one) != shop_without_ids(tmp_path / "other")
    ids = "SELECT stream_id FROM events WHERE stream_type = 'Customer' ORDER BY position"
    assert rows(one / "events.db", ids) != rows(tmp_path / "two" / "events.db", ids)


@pytest.mark.slow
def test_the_history_spans_the_days_asked_for_in_log_order_and_pending_orders_are_the_newest(tmp_path):
    seed(tmp_path)
    times = [datetime.fromisoformat(at) for (at,) in
             rows(tmp_path / "events.db", "SELECT recorded_at FROM events ORDER BY position")]
    assert times == sorted(times)  # a command's events share their commit's time
    assert 9 <= (times[-1] - times[0]).days <= 10
    placed = rows(tmp_path / "read.db", "SELECT status FROM orders ORDER BY placed_position")
    pending = [index for index, (status,) in enumerate(placed) if status == "PENDING"]
    assert pending and pending == list(range(len(placed) - len(pending), len(placed)))
    # None of them falls due as a server starts: at least a quarter of an hour is left on each
    # (half of the default 30 minutes), and each has its open deadline.
    due = [datetime.fromisoformat(at).replace(tzinfo=UTC) for (at,) in
           rows(tmp_path / "read.db", "SELECT payment_due_at FROM orders WHERE status = 'PENDING'")]
    assert len(due) == len(pending) and min(due) >= datetime.now(UTC) + timedelta(minutes=14)
    assert rows(tmp_path / "read.db", "SELECT count(*) FROM payment_deadlines") == [(len(pending),)]


def test_a_folder_that_holds_a_log_is_left_alone(tmp_path, capsys):
    orderstream.cli.main(["seed-demo", "--data-dir", str(tmp_path), "--products", "1", "--customers", "1",
                          "--orders", "0"])
    before = rows(tmp_path / "events.db", "SELECT count(*) FROM events")
    with pytest.raises(SystemExit) as stopped:
        seed(tmp_path)
    assert "already holds 2 events" in str(stopped.value) and "another --data-dir" in str(stopped.value)
    assert rows(tmp_path / "events.db", "SELECT count(*) FROM events") == before == [(2,)]


@pytest.mark.parametrize("argument", [["--orders", "many"], ["--products", "0"], ["--days", "-1"]])
def test_counts_out_of_range_are_refused_before_anything_is_written(tmp_path, capsys, argument):
    with pytest.raises(SystemExit) as stopped:
        orderstream.cli.main(["seed-demo", "--data-dir", str(tmp_path), *argument])
    assert stopped.value.code == 2
    assert "a whole number from" in capsys.readouterr().err
    assert not (tmp_path / "events.db").exists()
