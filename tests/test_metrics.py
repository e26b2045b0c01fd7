"""/metrics: Prometheus's text format, read back with prometheus-client's own parser after
real commands, each counter moved by exactly what was done; closed in production."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.settings import Settings
from tests.support.api import Api, asgi_api
from tests.support.mutations import STAFF, document, order_input, product_input, register, run, succeed

PRODUCT = "query($sku: String!, $at: Position) { product(sku: $sku, consistentWith: $at) { sku } }"
METRICS_TOKEN = "scrape-" + "s" * 24


async def scrape(api: Api, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    response = await api.http.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_each_counter_moves_by_exactly_what_was_done(api: Api):
    before = await scrape(api)
    customer = await register(api)  # registerCustomer: success
    added = await succeed(api, "addProduct", product_input("MUG", stock=1), STAFF)
    anonymous = await api.execute(document("addProduct"), {"input": product_input("CAP")})
    assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    refused = await run(api, "placeOrder", order_input(customer, ("MUG", 5)), STAFF)
    assert refused["code"] == "INSUFFICIENT_STOCK"
    placed = await succeed(api, "placeOrder", order_input(customer, ("MUG", 1)), STAFF)
    read = await api.execute(PRODUCT, {"sku": "MUG", "at": placed["position"]})
    assert read["data"]["product"] == {"sku": "MUG"}
    after = await scrape(api)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    commands = "orderstream_commands_total"
    assert moved(commands, command="registerCustomer", outcome="success") == 1
    assert moved(commands, command="addProduct", outcome="success") == 1
    assert moved(commands, command="addProduct", outcome="UNAUTHENTICATED") == 1
    assert moved(commands, command="placeOrder", outcome="INSUFFICIENT_STOCK") == 1
    assert moved(commands, command="placeOrder", outcome="success") == 1
    assert sum(v for (name, _), v in after.items() if name == commands) == 5
    assert moved("orderstream_command_duration_seconds_count", command="placeOrder") == 2

    # Customer: CustomerRegistered; Product: ProductAdded and StockReserved; Order: OrderPlaced.
    appended = "orderstream_events_appended_total"
    assert (moved(appended, stream_type="Customer"), moved(appended, stream_type="Product"),
            moved(appended, stream_type="Order")) == (1, 2, 1)
    assert value(after, "orderstream_log_head_position") == int(placed["position"]) == 4
    assert int(added["position"]) == 2

    requests = "orderstream_graphql_requests_total"
    # The refusal for want of stock is a result, not a GraphQL error; the anonymous one is an error.
    assert moved(requests, operation_type="mutation", outcome="success") == 4
    assert moved(requests, operation_type="mutation", outcome="error") == 1
    assert moved(requests, operation_type="query", outcome="success") == 1
    assert moved("orderstream_graphql_request_duration_seconds_count", operation_type="mutation") == 5
    assert moved("orderstream_consistency_wait_seconds_count") == 1

    projections = {"customers", "orders", "products", "sales", "exchange_rates", "payment_deadlines"}
    lags = {dict(labels)["projection"]: v for (name, labels), v in after.items()
            if name == "orderstream_projection_lag_events"}
    assert set(lags) == projections and all(0 <= lag <= 4 for lag in lags.values())
    assert {dict(labels)["projection"] for (name, labels) in after
            if name == "orderstream_projection_lag_seconds"} == projections


async def test_no_label_takes_an_id_or_a_document(api: Api):
    customer = await register(api)
    await succeed(api, "addProduct", product_input("MUG"), STAFF)
    await succeed(api, "placeOrder", order_input(customer, ("MUG", 1)), STAFF)
    labels = {value for (name, pairs) in await scrape(api) for _, value in pairs}
    assert customer not in labels and "MUG" not in labels
    assert all(len(label) <= 40 and "{" not in label for label in labels), labels


@pytest.mark.parametrize(("token", "sent", "status"), [
    (None, None, 404),
    (METRICS_TOKEN, None, 401),
    (METRICS_TOKEN, "Bearer wrong-token-of-some-length", 401),
    (METRICS_TOKEN, f"Bearer {METRICS_TOKEN}", 200),
])
async def test_in_production_metrics_answer_only_the_bearer_of_the_metrics_token(tmp_path, token, sent, status):
    environ = {"ORDERSTREAM_ENV": "production", **({"ORDERSTREAM_METRICS_TOKEN": token} if token else {})}
    async with asgi_api(tmp_path, environ) as api:
        response = await api.http.get("/metrics", headers={"Authorization": sent} if sent else {})
        assert response.status_code == status, response.text
        if status == 200:
            assert "orderstream_log_head_position 0.0" in response.text
        else:
            assert "orderstream_" not in response.text


def test_a_metrics_token_too_short_is_refused_without_repeating_it(tmp_path):
    with pytest.raises(SettingsError) as refused:
        Settings.load(str(tmp_path), environ={"ORDERSTREAM_METRICS_TOKEN": "hunter2"})
    assert "ORDERSTREAM_METRICS_TOKEN: expected a token of at least 16 characters" in str(refused.value)
    assert "hunter2" not in str(refused.value)
