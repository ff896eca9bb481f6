"""subscriber lookup index: the check reads the index alone

Revision ID: c0ffee5e1ec7
Revises: face27d573b8
Create Date: 2026-12-01 11:20:00.000000

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = 'c0ffee5e1ec7'
down_revision = 'face27d573b8'
branch_labels = None
depends_on = None


COLUMNS = ['email', 'public_id', 'left_all_reason', 'left_all_version', 'bounced_at', 'id']


def upgrade():
    # a plain CREATE INDEX, never a batch table copy: the table may hold millions of rows
    if op.get_bind().dialect.name == 'postgresql':
        # built without blocking writes: opt-outs keep arriving while a release migrates
        with op.get_context().autocommit_block():
            op.create_index(
                'ix_subscribers_lookup', 'subscribers', COLUMNS, unique=False, postgresql_concurrently=True
            )
    else:
        op.create_index('ix_subscribers_lookup', 'subscribers', COLUMNS, unique=False)


def downgrade():
    op.drop_index('ix_subscribers_lookup', table_name='subscribers')
