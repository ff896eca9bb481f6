"""one email index on PostgreSQL: the unique index carries the lookup's columns

Revision ID: e4a11d0c1b2a
Revises: c0ffee5e1ec7
Create Date: 2026-12-02 01:50:00.000000

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = 'e4a11d0c1b2a'
down_revision = 'c0ffee5e1ec7'
branch_labels = None
depends_on = None


INCLUDED = ['public_id', 'left_all_reason', 'left_all_version', 'bounced_at', 'id']
LOOKUP = ['email', *INCLUDED]


def upgrade():
    # SQLite has no INCLUDE: it keeps its unique constraint and the lookup index
    if op.get_bind().dialect.name != 'postgresql':
        return
    # built without blocking writes: opt-outs keep arriving while a release migrates
    with op.get_context().autocommit_block():
        # a build that failed part way leaves an invalid index behind: start again
        op.execute('DROP INDEX CONCURRENTLY IF EXISTS uq_subscribers_email_lookup')
        op.create_index(
            'uq_subscribers_email_lookup', 'subscribers', ['email'], unique=True,
            postgresql_include=INCLUDED, postgresql_concurrently=True,
        )
    # the new index already holds the address unique: the old constraint's goes at once
    op.drop_constraint('uq_subscribers_email', 'subscribers', type_='unique')
    with op.get_context().autocommit_block():
        op.drop_index('ix_subscribers_lookup', table_name='subscribers', postgresql_concurrently=True)


def downgrade():
    if op.get_bind().dialect.name != 'postgresql':
        return
    with op.get_context().autocommit_block():
        op.create_index('ix_subscribers_lookup', 'subscribers', LOOKUP, postgresql_concurrently=True)
        op.create_index(
            'uq_subscribers_email_plain', 'subscribers', ['email'], unique=True, postgresql_concurrently=True
        )
    op.drop_index('uq_subscribers_email_lookup', table_name='subscribers')
    op.execute(
        'ALTER TABLE subscribers ADD CONSTRAINT uq_subscribers_email UNIQUE USING INDEX uq_subscribers_email_plain'
    )
