"""/api/v1/openapi.json: the OpenAPI 3.0 description of every API endpoint."""

from __future__ import annotations

from aiohttp import web

from core.events import DELIVERY_STATUS, ENGAGEMENT_LADDER, Classification, EventType
from storage.feed import FILTERS


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": _json(_ref("Error"), "Bad request"),
    "401": _json(_ref("Error"), "Missing or unknown bearer token"),
    "403": _json(_ref("Error"), "Not allowed for this user"),
    "404": _json(_ref("Error"), "Not found"),
}
NULLABLE_STR = {"type": "string", "nullable": True}
TIME = {"type": "string", "format": "date-time", "nullable": True}
EMAIL = {"name": "email", "in": "path", "required": True, "schema": {"type": "string"}}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}


def _op(summary: str, ok: dict, *, params: list | None = None, body: dict | None = None,
        errors: tuple[str, ...] = ("400", "401", "404")) -> dict:
    op = {"summary": summary, "responses": {**ok, **{c: ERRORS[c] for c in errors}}}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


#: A feed recipient's statuses (``core.events.recipient_status``), in EventType's order.
RECIPIENT_STATUSES = [str(t) for t in EventType
                      if t in ENGAGEMENT_LADDER or t in DELIVERY_STATUS.values()]

SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    "Event": {"type": "object", "required": ["id", "type", "at", "message", "message_id", "classification"],
              "properties": {
                  "id": {"type": "integer"},
                  "type": {"type": "string", "enum": [str(t) for t in EventType]},
                  "at": {"type": "string", "format": "date-time"}, "message": {"type": "integer"},
                  "message_id": {"type": "string"}, "recipient": NULLABLE_STR, "url": NULLABLE_STR,
                  "user_agent": NULLABLE_STR, "ip": NULLABLE_STR, "client": NULLABLE_STR,
                  "classification": {"type": "string", "nullable": True,
                                     "enum": [*(str(c) for c in Classification), None]},
                  "reason": NULLABLE_STR, "first": {"type": "boolean"}, "inferred": {"type": "boolean"}}},
    "Recipient": {"type": "object", "properties": {
        "id": {"type": "integer", "description": "the copy's id (the pages' /messages/{id}/copies/{copy})"},
        "address": {"type": "string"},
        "status": {"type": "string", "enum": RECIPIENT_STATUSES},
        "tracked_opens": {"type": "boolean"}, "tracked_clicks": {"type": "boolean"},
        "reasons": {"type": "array", "items": {"type": "string"}}, "opens": {"type": "integer"},
        "machine_opens": {"type": "integer"}, "self_opens": {"type": "integer"}, "first_opened_at": TIME, "last_opened_at": TIME,
        "clicks": {"type": "array", "items": {"type": "object", "properties": {
            "url": {"type": "string"}, "count": {"type": "integer"}, "first_clicked_at": TIME}}},
        "machine_clicks": {"type": "integer"}, "sent_at": TIME,
        "name": {"type": "string", "nullable": True, "description": "display name from the logged To/Cc"}}},
    "Message": {"type": "object", "required": ["id", "message_id", "recipients"], "properties": {
        "id": {"type": "integer"}, "message_id": {"type": "string"}, "subject": {"type": "string"},
        "from": {"type": "string"}, "accepted_at": {"type": "string", "format": "date-time"},
        "logged": {"type": "boolean"}, "recipients": {"type": "array", "items": _ref("Recipient")},
        "events": {"type": "array", "items": _ref("Event")}}},
    "Contact": {"type": "object", "required": ["email"], "properties": {
        "email": {"type": "string"}, "owner": NULLABLE_STR, "marketing": {"type": "boolean"},
        "legal_basis": NULLABLE_STR, "do_not_track": {"type": "boolean"}, "company": NULLABLE_STR,
        "last_open_at": TIME, "last_click_at": TIME, "last_engagement_at": TIME}},
    "ContactChange": {"type": "object", "additionalProperties": False, "properties": {
        "legal_basis": {"type": "string", "nullable": True, "enum": [
            "consent", "contract", "legal_obligation", "vital_interests", "public_task", "legitimate_interests",
            None]},
        "do_not_track": {"type": "boolean"}, "owner": NULLABLE_STR, "marketing": {"type": "boolean"}}},
    "LoggedEmail": {"type": "object", "properties": {
        "id": {"type": "integer"}, "direction": {"type": "string", "enum": ["outgoing", "incoming"]},
        "subject": {"type": "string"}, "from": {"type": "string"}, "to": {"type": "string"},
        "cc": {"type": "string"}, "date": TIME, "pinned": {"type": "boolean"}, "thread": {"type": "string"},
        "text": NULLABLE_STR, "html": NULLABLE_STR,
        "attachments": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "integer"}, "filename": {"type": "string"}, "content_type": {"type": "string"},
            "size": {"type": "integer"}}}},
        "omitted_attachments": {"type": "array", "items": {"type": "object", "properties": {
            "filename": {"type": "string"}, "size": {"type": "integer"}, "reason": {"type": "string"}}}}}},
    "NeverLogChange": {"type": "object", "required": ["entries"], "properties": {
        "scope": {"type": "string", "enum": ["user", "team"]},
        "entries": {"type": "array", "items": {"type": "string"}, "minItems": 1}}},
}

PATHS = {
    "/api/v1/events": {"get": _op(
        "The user's events in commit order (admins: everybody's)",
        {"200": _json({"type": "object", "properties": {"events": {"type": "array", "items": _ref("Event")},
                                                         "next": NULLABLE_STR}})},
        params=[{"name": "after", "in": "query", "schema": {"type": "string"}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"}}, LIMIT], errors=("400", "401"))},
    "/api/v1/events/stream": {"get": _op(
        "Server-Sent Events: the user's events as they happen (Last-Event-ID resumes)",
        {"200": {"description": "An event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
        params=[{"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}], errors=("400", "401"))},
    "/api/v1/messages": {"get": _op(
        "The activity feed, newest first",
        {"200": _json({"type": "object", "properties": {"messages": {"type": "array", "items": _ref("Message")},
                                                         "next": NULLABLE_STR}})},
        params=[LIMIT, {"name": "cursor", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "tracked", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}},
                {"name": "status", "in": "query", "description": "messages with a recipient in this state",
                 "schema": {"type": "string", "enum": [str(f) for f in FILTERS]}},
                {"name": "q", "in": "query", "description": "search subject, recipient address, company",
                 "schema": {"type": "string", "maxLength": 200}}],
        errors=("400", "401"))},
    "/api/v1/messages/{id}": {"get": _op("One message with its events", {"200": _json(_ref("Message"))},
                                         params=[ID])},
    "/api/v1/contacts/{email}": {
        "get": _op("A contact", {"200": _json(_ref("Contact"))}, params=[EMAIL]),
        "put": _op("Change legal basis, do_not_track, owner, marketing (admins and the owner)",
                   {"200": _json(_ref("Contact"))}, params=[EMAIL], body=_ref("ContactChange"),
                   errors=("400", "401", "403", "404")),
        "delete": _op("GDPR erase (admins)", {"204": {"description": "Erased"}}, params=[EMAIL],
                      errors=("401", "403", "404"))},
    "/api/v1/contacts/{email}/timeline": {"get": _op(
        "Logged emails on the contact's timeline, pinned first",
        {"200": _json({"type": "object", "properties": {"logged_emails": {"type": "array",
                                                                           "items": _ref("LoggedEmail")}}})},
        params=[EMAIL])},
    "/api/v1/logged-emails/{id}": {
        "get": _op("A logged email with its bodies", {"200": _json(_ref("LoggedEmail"))}, params=[ID]),
        "delete": _op("Delete (its sender or an admin)", {"204": {"description": "Deleted"}}, params=[ID],
                      errors=("401", "403", "404"))},
    "/api/v1/logged-emails/{id}/thread": {"get": _op(
        "The logged emails of its thread",
        {"200": _json({"type": "object", "properties": {"thread": {"type": "string"},
                                                         "logged_emails": {"type": "array",
                                                                           "items": _ref("LoggedEmail")}}})},
        params=[ID])},
    "/api/v1/logged-emails/{id}/pin": {"post": _op("Pin on the timeline", {"200": _json(_ref("LoggedEmail"))},
                                                   params=[ID])},
    "/api/v1/logged-emails/{id}/unpin": {"post": _op("Unpin", {"200": _json(_ref("LoggedEmail"))}, params=[ID])},
    "/api/v1/attachments/{id}": {"get": _op(
        "An attachment's bytes, always as a download",
        {"200": {"description": "The bytes", "content": {"application/octet-stream": {"schema": {
            "type": "string", "format": "binary"}}}}}, params=[ID])},
    "/api/v1/never-log": {
        "get": _op("A Never Log list (scope user: yours; team)",
                   {"200": _json({"type": "object", "properties": {"scope": {"type": "string"},
                                                                    "entries": {"type": "array"}}})},
                   params=[{"name": "scope", "in": "query", "schema": {"type": "string", "enum": ["user", "team"]}}],
                   errors=("400", "401")),
        "post": _op("Add entries (team: admins)", {"201": _json({"type": "object"})}, body=_ref("NeverLogChange"),
                    errors=("400", "401", "403")),
        "delete": _op("Remove entries (team: admins; config entries are read-only)", {"200": _json({"type": "object"})},
                      body=_ref("NeverLogChange"), errors=("400", "401", "403"))},
}


def document() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {"title": "trackrelay API", "version": "1"},
        "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": PATHS,
    }


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
