"""Strategies for orderstream's own scalars, for schemathesis in its GraphQL mode against a
running server (the command is in docs/guarantees.md):

    SCHEMATHESIS_HOOKS=tests.support.schemathesis_hooks st run http://127.0.0.1:8000/graphql ...

Date and DateTime schemathesis knows already. Values of the right shape and ones that are not.
schemathesis is no dependency of the project: it runs from a virtual environment of its own.
"""

import schemathesis
from hypothesis import strategies as st
from schemathesis.graphql import nodes

schemathesis.graphql.scalar("Decimal", st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False, places=2).map(str),
    st.sampled_from(["10.00", "0", "-1", "1e999999", "NaN", "Infinity", "9" * 400]),
    st.text(max_size=12)).map(nodes.String))
schemathesis.graphql.scalar("Position", st.one_of(
    st.integers(-2, 10**20).map(str), st.text(max_size=12)).map(nodes.String))
schemathesis.graphql.scalar("JSON", st.sampled_from(["{}", "[]", "null"]).map(nodes.String))
