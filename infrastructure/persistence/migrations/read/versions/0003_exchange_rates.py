"""Exchange rates, and sales converted at the rate in force when each order was paid.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    # A database made before migrations existed may have these tables already (made from
    # the code's declarations, as the first revision's are): it is adopted as it is.
    if sa.inspect(op.get_bind()).has_table("exchange_rates"):
        return
    op.create_table(
        "exchange_rates",
        sa.Column("base", sa.String(3), nullable=False),
        sa.Column("quote", sa.String(3), nullable=False),
        sa.Column("valid_from", MOMENT, nullable=False),
        sa.Column("rate", sa.String(40), nullable=False),
        sa.Column("derived", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("base", "quote", "valid_from"),
    )
    op.create_table(
        "fx_pairs",
        sa.Column("base", sa.String(3), nullable=False),
        sa.Column("quote", sa.String(3), nullable=False),
        sa.PrimaryKeyConstraint("base", "quote"),
    )
    op.create_table(
        "fx_payments",
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("paid_at", MOMENT, nullable=False),
        sa.Column("cancelled_at", MOMENT),
        sa.PrimaryKeyConstraint("order_id"),
    )
    op.create_index("ix_fx_payments_currency_paid_at", "fx_payments", ["currency", "paid_at"])
    op.create_table(
        "fx_converted",
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("reporting_currency", sa.String(3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("order_id", "reporting_currency"),
    )
    op.create_table(
        "fx_buckets",
        sa.Column("bucket_start", MOMENT, nullable=False),
        sa.Column("reporting_currency", sa.String(3), nullable=False),
        sa.Column("orders", sa.Integer(), nullable=False),
        sa.Column("revenue_minor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("bucket_start", "reporting_currency"),
    )


def downgrade() -> None:
    for table in ("fx_buckets", "fx_converted", "fx_payments", "fx_pairs", "exchange_rates"):
        op.drop_table(table)
