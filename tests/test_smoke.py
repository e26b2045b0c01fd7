from tests.support.tokens import bearer

REGISTER = """
mutation($input: RegisterCustomerInput!) {
  registerCustomer(input: $input) {
    __typename
    ... on RegisterCustomerSuccess { customerId position }
    ... on DomainError { code message }
  }
}
"""


async def test_register_then_read_history_position(api):
    result = await api.execute(REGISTER, {"input": {"name": "Ann", "email": "ann@example.com",
                                                    "country": "DE"}})
    success = result["data"]["registerCustomer"]
    assert success["__typename"] == "RegisterCustomerSuccess"
    assert success["position"] == "1"


async def test_healthz(api):
    response = await api.http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["projector"] == "running"


async def test_graphiql_page(api):
    response = await api.http.get("/graphql", headers={"Accept": "text/html"})
    assert response.status_code in (200, 503)  # 503: not built, and the page says how to build it
    assert "graphiql" in response.text.lower()


async def test_staff_token_is_accepted(api):
    result = await api.execute("""mutation { addProduct(input: {sku: "S-1", name: "Mug",
        price: {amount: "4.50", currency: "EUR"}, initialStock: 3}) { __typename } }""",
        headers=bearer("staff"))
    assert result["data"]["addProduct"]["__typename"] == "ProductSuccess"
