"""merge companies made per subdomain into their registrable domain's company (issue 21)

Before companies were grouped by registrable domain (``core.companies.registrable``: the Public
Suffix List's eTLD+1, IDNA 2008), each email domain made its own company: ``eu.acme.com`` and
``acme.com`` were two, and an internationalised domain was stored as written (``münchen.de``
beside ``xn--mnchen-3ya.de``). Each group of companies with the same registrable domain becomes
one: the company already named by the registrable domain if there is one, else the group's
oldest (lowest id), renamed to it. Its contacts and the logged emails' ``company`` associations
are re-pointed to it (an email on both timelines keeps one), and the others are deleted. A
company's name is kept unless it was the automatic one (its domain), which follows the domain.

Idempotent: a second run finds every company already under its registrable domain. A domain that
is not a domain (``registrable`` None) is left alone, and so are free-mail companies: grouping
changes nothing for them here. The downgrade does nothing (the merge cannot be told apart).

Revision ID: 0010
Revises: 0009
"""
from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

from core import companies
from core.idn import to_unicode

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

_companies = sa.table("companies", sa.column("id", sa.BigInteger), sa.column("domain", sa.String),
                      sa.column("name", sa.String))
_contacts = sa.table("contacts", sa.column("id", sa.BigInteger), sa.column("company_pk", sa.BigInteger))
_assoc = sa.table("logged_associations", sa.column("logged_pk", sa.BigInteger), sa.column("kind", sa.String),
                  sa.column("target_pk", sa.BigInteger))


def _auto_name(name: str | None, domain: str) -> bool:
    """Whether ``name`` is the one a company got automatically from ``domain`` (or none at all)."""
    if not name:
        return True
    forms = {domain.lower()}
    try:
        forms.add(to_unicode(domain).lower())
    except Exception:  # a stored domain that does not convert: only its own spelling
        pass
    return name.strip().lower() in forms


def plan(rows: list[tuple[int, str, str | None]]) -> list[tuple[int, str, str | None, list[int]]]:
    """(target id, its registrable domain, its new name or None to keep it, the ids merged into
    it) for each group of ``rows`` (id, domain, name) that is not already one company under its
    registrable domain."""
    groups: dict[str, list[tuple[int, str, str | None]]] = {}
    for pk, domain, name in rows:
        key = companies.registrable(domain or "")
        if key:
            groups.setdefault(key, []).append((pk, domain, name))
    out = []
    for key, members in groups.items():
        exact = [m for m in members if m[1] == key]
        if exact and len(members) == 1:
            continue
        target = exact[0] if exact else min(members)
        name = None
        if target[1] != key and _auto_name(target[2], target[1]):
            name = to_unicode(key)
        out.append((target[0], key, name, sorted(m[0] for m in members if m[0] != target[0])))
    return out


def merge(conn) -> int:
    """Merge on ``conn`` (a synchronous connection); the number of companies merged away."""
    rows = [tuple(r) for r in conn.execute(sa.select(_companies.c.id, _companies.c.domain, _companies.c.name)
                                           .order_by(_companies.c.id)).all()]
    merged = 0
    for target, key, name, others in plan(rows):
        if others:
            conn.execute(sa.update(_contacts).where(_contacts.c.company_pk.in_(others)).values(company_pk=target))
            already = sa.select(_assoc.c.logged_pk).where(_assoc.c.kind == "company", _assoc.c.target_pk == target)
            conn.execute(sa.delete(_assoc).where(_assoc.c.kind == "company", _assoc.c.target_pk.in_(others),
                                                 _assoc.c.logged_pk.in_(already.scalar_subquery())))
            # Two merged-away companies on one email's timeline: keep the first, then re-point.
            dup = sa.select(_assoc.c.logged_pk).where(_assoc.c.kind == "company", _assoc.c.target_pk.in_(others)) \
                .group_by(_assoc.c.logged_pk).having(sa.func.count() > 1)
            for (logged_pk,) in conn.execute(dup).all():
                keep = min(r[0] for r in conn.execute(sa.select(_assoc.c.target_pk).where(
                    _assoc.c.kind == "company", _assoc.c.logged_pk == logged_pk, _assoc.c.target_pk.in_(others))))
                conn.execute(sa.delete(_assoc).where(_assoc.c.kind == "company", _assoc.c.logged_pk == logged_pk,
                                                     _assoc.c.target_pk.in_(others), _assoc.c.target_pk != keep))
            conn.execute(sa.update(_assoc).where(_assoc.c.kind == "company", _assoc.c.target_pk.in_(others))
                         .values(target_pk=target))
            conn.execute(sa.delete(_companies).where(_companies.c.id.in_(others)))
            merged += len(others)
        values = {"domain": key}
        if name is not None:
            values["name"] = name
        conn.execute(sa.update(_companies).where(_companies.c.id == target).values(**values))
        log.info("companies: %s is company %d%s", key, target,
                 f" (merged {', '.join(map(str, others))})" if others else " (renamed)")
    return merged


def upgrade() -> None:
    merge(op.get_bind())


def downgrade() -> None:
    pass
