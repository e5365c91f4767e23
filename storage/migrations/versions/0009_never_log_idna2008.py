"""Never Log entries stored before IDNA 2008 re-normalised with today's ``normalise_entry``
(issue 17)

Entries were stored normalised only: ``never_log.entry`` holds the form the old code made of what
was typed (lower case, the domain through Python's IDNA 2003 codec), not the text itself. Each
stored entry is run through today's ``core.neverlog.normalise_entry`` (IDNA 2008, UTS #46
non-transitional); where that gives another valid form, the entry is rewritten to it (or, when
the list already holds that form, the duplicate is removed). An entry today's rules refuse (an
IDNA 2003 ``xn--`` label IDNA 2008 does not allow, such as a symbol domain) is left as stored: it
still matches exactly the addresses it matched before.

What this cannot do: IDNA 2003 mapped the deviation characters away (``ß`` to ``ss``, final
``ς`` to ``σ``, the joiners ZWJ/ZWNJ removed), so an entry typed as ``*@straße.de`` was stored as
``*@strasse.de``, which is also exactly what a real ``*@strasse.de`` is stored as. The original
text was not kept, so the migration cannot know which was meant and leaves such entries alone
(their stored form is what today's rules make of it as well). Reading such an old entry with
both meanings at match time is ``core.neverlog.matches_legacy`` (an address at ``straße.de`` also
matches an old entry under ``strasse.de``, the form IDNA 2003 gave it: widening only); it is not
wired, because the lists do not tell old entries from new ones, and an entry made today under
``strasse.de`` must mean that domain alone.

Idempotent; the downgrade does nothing (the old forms are not kept).

Revision ID: 0009
Revises: 0008
"""
from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

from core.neverlog import EntryError, normalise_entry

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

_never_log = sa.table("never_log", sa.column("id", sa.BigInteger), sa.column("scope", sa.String),
                      sa.column("user", sa.String), sa.column("entry", sa.String))


def renormalise(conn) -> tuple[int, int, int]:
    """Re-normalise on ``conn`` (synchronous): (rewritten, duplicates removed, refused and left)."""
    t = _never_log
    rows = conn.execute(sa.select(t.c.id, t.c.scope, t.c.user, t.c.entry).order_by(t.c.id)).all()
    held = {(scope, user, entry) for _, scope, user, entry in rows}
    rewritten = removed = refused = 0
    for pk, scope, user, entry in rows:
        try:
            new = normalise_entry(entry)
        except EntryError as e:
            refused += 1
            log.warning("never_log: entry %d left as stored (today's rules refuse it: %s)", pk, e)
            continue
        if new == entry:
            continue
        if (scope, user, new) in held:
            conn.execute(sa.delete(t).where(t.c.id == pk))
            removed += 1
        else:
            conn.execute(sa.update(t).where(t.c.id == pk).values(entry=new))
            held.add((scope, user, new))
            rewritten += 1
        held.discard((scope, user, entry))
    return rewritten, removed, refused


def upgrade() -> None:
    rewritten, removed, refused = renormalise(op.get_bind())
    if rewritten or removed or refused:
        log.info("never_log: %d entries re-normalised, %d duplicates removed, %d left as stored",
                 rewritten, removed, refused)


def downgrade() -> None:
    pass
