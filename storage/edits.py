"""Changes the team makes through the API and the pages to what the CRM keeps: a contact's
fields, a logged email's pin."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Contact, LoggedEmail

#: The fields of a contact the API may change.
CONTACT_FIELDS = frozenset({"legal_basis", "do_not_track", "owner", "marketing"})


async def change_contact(session: AsyncSession, contact: Contact, changes: dict) -> None:
    """Set a contact's ``changes`` (names from CONTACT_FIELDS, values checked by the caller)."""
    for name, value in changes.items():
        if name not in CONTACT_FIELDS:
            raise ValueError(f"not a contact field the API changes: {name}")
        setattr(contact, name, value)
    await session.flush()


def set_pinned(email: LoggedEmail, pinned: bool) -> None:
    """Pin a logged email to the top of its timelines, or unpin it (written with the session's
    transaction)."""
    email.pinned = pinned
