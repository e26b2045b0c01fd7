"""Projection checkpoints and the read models of customers, products, orders and sales.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "projection_checkpoints",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("rebuilding", sa.Boolean(), nullable=False),
        sa.Column("failed_position", sa.BigInteger()),
        sa.Column("error", sa.Text()),
        sa.Column("updated_at", MOMENT, nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "customers",
        sa.Column("customer_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("email", sa.String(254)),
        sa.Column("country", sa.String(2), nullable=False),
        sa.Column("locale", sa.String(35)),
        sa.Column("registered_at", MOMENT, nullable=False),
        sa.Column("forgotten", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("customer_id"),
    )
    op.create_table(
        "products",
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("name_folded", sa.String(200), nullable=False),
        sa.Column("price", sa.String(32), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("stock_available", sa.Integer(), nullable=False),
        sa.Column("stock_reserved", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", MOMENT, nullable=False),
        sa.PrimaryKeyConstraint("sku"),
    )
    op.create_table(
        "orders",
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("customer_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("total", sa.String(32), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("ship_name", sa.String(200)),
        sa.Column("ship_line1", sa.String(200)),
        sa.Column("ship_line2", sa.String(200)),
        sa.Column("ship_city", sa.String(100)),
        sa.Column("ship_postal_code", sa.String(20)),
        sa.Column("ship_country", sa.String(2)),
        sa.Column("tracking_number", sa.String(100)),
        sa.Column("cancel_reason", sa.String(500)),
        sa.Column("placed_at", MOMENT, nullable=False),
        sa.Column("placed_position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", MOMENT, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
    )
    op.create_index("ix_orders_customer_id_placed_position", "orders", ["customer_id", "placed_position"])
    op.create_index("ix_orders_customer_id_status_placed_position", "orders",
                    ["customer_id", "status", "placed_position"])
    op.create_table(
        "order_lines",
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price", sa.String(32), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.PrimaryKeyConstraint("order_id", "line_no"),
    )
    op.create_table(
        "sales_buckets",
        sa.Column("bucket_start", MOMENT, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("orders", sa.Integer(), nullable=False),
        sa.Column("revenue_minor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("bucket_start", "currency"),
    )
    op.create_table(
        "sales_paid_orders",
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
    )


def downgrade() -> None:
    for table in ("sales_paid_orders", "sales_buckets", "order_lines", "orders", "products", "customers",
                  "projection_checkpoints"):
        op.drop_table(table)
