"""Payment deadlines: each order's due time, and the deadlines still open.

Orders projected before this revision keep an empty payment_due_at until the orders read
model is rebuilt (`orderstream projections rebuild orders`); the payment_deadlines
projection starts from the beginning of the log and finds every open deadline.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    # A database made before migrations existed may have these already (made from the
    # code's declarations, as the first revision's are): it is adopted as it is.
    inspector = sa.inspect(op.get_bind())
    if "payment_due_at" not in {column["name"] for column in inspector.get_columns("orders")}:
        op.add_column("orders", sa.Column("payment_due_at", MOMENT))
    if inspector.has_table("payment_deadlines"):
        return
    op.create_table(
        "payment_deadlines",
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("due_at", MOMENT, nullable=False),
        sa.Column("placed_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
    )
    op.create_index("ix_payment_deadlines_due_at", "payment_deadlines", ["due_at"])


def downgrade() -> None:
    op.drop_table("payment_deadlines")
    op.drop_column("orders", "payment_due_at")
