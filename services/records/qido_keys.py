"""QIDO-RS query keys named by tag, as by keyword: `00100020=...` is `PatientID=...` (PS3.18 8.3.4.1,
{attributeID} is a keyword or a tag). OHIF names the Patient ID by its tag; the routes read keys by keyword,
so a key named by tag was ignored, and a search for another patient's studies listed this case's.

An ASGI middleware on `/dicomweb` rewrites each key that is a tag of the DICOM dictionary to its keyword
before routing; values are left as sent.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode

import pydicom.datadict
from starlette.types import ASGIApp, Receive, Scope, Send

PREFIX = "/dicomweb/"
TAG = re.compile(r"[0-9A-Fa-f]{8}")


def by_keyword(query: str) -> str:
    """`query` with each key that is a dictionary tag named by its keyword instead."""
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(TAG.fullmatch(key) for key, _ in pairs):
        return query
    renamed = [
        ((pydicom.datadict.keyword_for_tag(int(key, 16)) or key) if TAG.fullmatch(key) else key, value)
        for key, value in pairs
    ]
    return urlencode(renamed)


class QueryKeysByKeyword:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX) and scope.get("query_string"):
            query = scope["query_string"].decode("latin-1")
            renamed = by_keyword(query)
            if renamed != query:
                scope = {**scope, "query_string": renamed.encode("latin-1")}
        await self.app(scope, receive, send)
