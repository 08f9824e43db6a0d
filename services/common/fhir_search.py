"""FHIR R4 search (search.html) as every service at the public base answers it: the parameters a type declares
read from the query (GET) or the form body (POST [type]/_search), a `searchset` Bundle with `total` and absolute
`self`/`next` links, paged by an opaque cursor.

- Unknown parameters (search.html#errors): with `Prefer: handling=strict` a 400 naming them; otherwise ignored,
  and the `self` link lists only what was applied.
- A value that cannot be read (a date with an unknown prefix, an empty token) is a 400 naming the parameter; a
  message never quotes the value (it may be an MRN).
- `,` within a value is OR, a parameter repeated is AND (search.html#combining).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import Request
from sqlalchemy import and_, func, or_, tuple_
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col, select

from services.common.fhir import outcome_response
from services.common.fhir_params import SearchParam

FORM = "application/x-www-form-urlencoded"
DEFAULT_COUNT = 20
MAX_COUNT = 100
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_DATE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,6}))?)?(?P<z>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
# Parameters every search takes whatever the type; `_format` is read by fhir_json_only.
CONTROL = ("_count", "_cursor", "_include", "_format")


@dataclass(frozen=True)
class Token:
    """`[system|]code`: `system` None means any system; "" means none."""

    code: str
    system: str | None = None


@dataclass(frozen=True)
class DateBound:
    """A date search value: its prefix and the range its precision covers, [start, end)."""

    prefix: str
    start: datetime
    end: datetime


@dataclass
class Search:
    """What a search asks: per parameter, its occurrences (AND), each a list of values (OR)."""

    criteria: dict[str, list[list[Any]]] = field(default_factory=dict)
    count: int = DEFAULT_COUNT
    cursor: list[Any] | None = None
    includes: list[str] = field(default_factory=list)
    applied: list[tuple[str, str]] = field(default_factory=list)  # for the self link, as sent

    def values(self, name: str) -> list[list[Any]]:
        return self.criteria.get(name, [])


class SearchRefused(Exception):
    """A search that cannot be answered: a 400 OperationOutcome naming `parameter`."""

    def __init__(self, parameter: str, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.parameter, self.message, self.code = parameter, message, code

    def answer(self) -> Any:
        return outcome_response(400, self.code, [(self.parameter, self.message)])


async def sent_parameters(request: Request) -> list[tuple[str, str]]:
    """The search's parameters: the query string, and for POST [type]/_search the form body too."""
    params = list(request.query_params.multi_items())
    if request.method == "POST":
        kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if kind != FORM:
            raise SearchRefused("Content-Type", f"POST [type]/_search takes the parameters as {FORM}")
        try:
            params += parse_qsl((await request.body()).decode(), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError as exc:
            raise SearchRefused("_search", "the form body is not UTF-8") from exc
    return params


def strict(prefer: str | None) -> bool:
    """Whether `Prefer: handling=strict` was sent (search.html#errors; lenient is the default)."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";")[0].partition("=")
        if name.strip().lower() == "handling" and value.strip().strip('"').lower() == "strict":
            return True
    return False


def read_search(
    params: Iterable[tuple[str, str]],
    declared: dict[str, SearchParam],
    prefer: str | None,
    includes: Iterable[str] = (),
) -> Search:
    """Read the parameters a type declares (`declared`, by name) into a Search; SearchRefused for a value that
    cannot be read, and for unknown parameters when the client asked for strict handling."""
    search, unknown = Search(), []
    known_includes = set(includes)
    for name, value in params:
        if name == "_format":
            continue
        if name == "_count":
            try:
                count = int(value)
            except ValueError:
                raise SearchRefused("_count", f"must be a whole number from 0 to {MAX_COUNT}") from None
            if count < 0:
                raise SearchRefused("_count", f"must be a whole number from 0 to {MAX_COUNT}")
            search.count = min(count, MAX_COUNT)  # a larger page is answered with the largest served
        elif name == "_cursor":
            search.cursor = decode_cursor(value)
        elif name == "_include":
            if value not in known_includes:
                unknown.append(name)
                continue
            search.includes.append(value)
            search.applied.append((name, value))
        elif name in declared:
            param = declared[name]
            search.criteria.setdefault(name, []).append(
                [read_value(param, part) for part in split_or(value, name)]
            )
            search.applied.append((name, value))
        else:
            unknown.append(name)
    if unknown and strict(prefer):
        names = ", ".join(sorted(set(unknown)))
        served = ", ".join([*declared, "_count", *(["_include"] if known_includes else [])])
        raise SearchRefused(
            names, f"unknown search parameter(s) {names}; this type is searched by {served}", "not-supported"
        )
    return search


def split_or(value: str, name: str) -> list[str]:
    """The values of one parameter, split at each comma not escaped (`\\,`)."""
    parts = [p.replace("\\,", ",") for p in re.split(r"(?<!\\),", value)]
    if any(not p for p in parts):
        raise SearchRefused(
            name, "has an empty value; send name=value (a comma separates values, any of them)"
        )
    return parts


def read_value(param: SearchParam, text: str) -> Any:
    if param.kind == "token":
        return read_token(param.name, text)
    if param.kind == "reference":
        return read_reference(param, text)
    if param.kind == "date":
        return read_date(param.name, text)
    return text


def read_token(name: str, text: str) -> Token:
    system, bar, code = text.partition("|")
    token = Token(code=code, system=system) if bar else Token(code=text)
    if not token.code or "\x00" in text:
        raise SearchRefused(name, "must be a token: [system|]code, with a code")
    return token


def read_reference(param: SearchParam, text: str) -> str | None:
    """The id a reference value names: `id`, `Type/id` or `[base]/Type/id`; None when it names another type
    (nothing matches)."""
    parts = text.rstrip("/").split("/")
    if len(parts) >= 2 and "_history" in parts[-2:]:
        parts = parts[: parts.index("_history")]
    if len(parts) == 1:
        kind, ident = param.target, parts[0]
    else:
        kind, ident = parts[-2], parts[-1]
    if not _ID.fullmatch(ident):
        raise SearchRefused(param.name, f"must reference a {param.target}: {param.target}/[id] or [id]")
    return ident if kind == param.target else None


def read_date(name: str, text: str) -> DateBound:
    prefix = text[:2] if text[:2].isalpha() else "eq"
    body = text[2:] if text[:2].isalpha() else text
    # An unescaped `+` of an offset arrives as a space.
    body = body.replace(" ", "+")
    found = _DATE.fullmatch(body)
    if prefix not in PREFIXES or found is None:
        raise SearchRefused(
            name,
            f"must be a date or dateTime with an optional prefix ({', '.join(PREFIXES)}), e.g. "
            "ge2026-12-01 or lt2026-12-07T10:00:00Z",
        )
    try:
        start, step = _bound(found)
    except ValueError:
        raise SearchRefused(name, "is not a date on the calendar") from None
    except OverflowError:
        raise SearchRefused(name, "is outside the years 1 to 9999 in UTC") from None
    try:
        end = _add(start, step)
    except (ValueError, OverflowError):  # the range of the year 9999 (in UTC) ends past what is held
        end = datetime.max.replace(tzinfo=UTC)
    return DateBound(prefix=prefix, start=start, end=end)


def _bound(found: re.Match[str]) -> tuple[datetime, str]:
    g = found.groupdict()
    zone = g["z"] or "Z"
    offset = timedelta(0) if zone == "Z" else timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    offset = -offset if zone.startswith("-") else offset
    parts = [int(g["y"]), int(g["m"] or 1), int(g["d"] or 1), int(g["H"] or 0), int(g["M"] or 0),
             int(g["S"] or 0), int((g["f"] or "0").ljust(6, "0"))]  # fmt: skip
    step = next(
        (unit for unit, key in (("microsecond", "f"), ("second", "S"), ("minute", "M"), ("day", "d"),
                                ("month", "m")) if g[key]),
        "year",
    )  # fmt: skip
    return datetime(*parts, tzinfo=UTC) - offset, step  # type: ignore[arg-type,misc]


def _add(start: datetime, step: str) -> datetime:
    if step == "year":
        return start.replace(year=start.year + 1)
    if step == "month":
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start + {"day": timedelta(days=1), "minute": timedelta(minutes=1), "second": timedelta(seconds=1),
                    "microsecond": timedelta(microseconds=1)}[step]  # fmt: skip


def date_condition(column: Any, bound: DateBound) -> ColumnElement[bool]:
    """The SQL condition a date value puts on `column` (search.html#prefix, against the value's range)."""
    start, end = bound.start, bound.end
    return {
        "eq": and_(column >= start, column < end),
        "ap": and_(column >= start, column < end),
        "ne": or_(column < start, column >= end),
        "gt": column >= end,
        "sa": column >= end,
        "ge": column >= start,
        "lt": column < start,
        "eb": column < start,
        "le": column < end,
    }[bound.prefix]


def all_of(search: Search, name: str, condition: Any) -> list[ColumnElement[bool]]:
    """One condition per occurrence of `name` (AND), each any of its values (OR); `condition(value)` is the
    SQL condition of one value."""
    return [or_(*[condition(v) for v in alternatives]) for alternatives in search.values(name)]


def encode_cursor(values: list[Any]) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else v for v in values]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> list[Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError("not a cursor")
        if any("\x00" in v for v in values):
            raise ValueError("not a cursor")
        return values
    except (ValueError, TypeError) as exc:
        raise SearchRefused(
            "_cursor", "is not one this server returned; follow the Bundle's next link"
        ) from exc


def newest_first_page(
    session: Any, model: Any, where: list[Any], search: Search
) -> tuple[int, list[Any], str | None]:
    """(total, the page of `model` rows matching `where`, newest first, the next page's cursor): keyset paging on
    (created_at, id), so a page costs the same however deep the search has gone."""
    total = session.exec(select(func.count()).select_from(model).where(*where)).one()
    if search.count == 0:
        return total, [], None
    query = select(model).where(*where)
    if search.cursor is not None:
        if len(search.cursor) != 2:
            raise SearchRefused("_cursor", "is not one this server returned; follow the Bundle's next link")
        after = (as_datetime(search.cursor[0]), search.cursor[1])
        query = query.where(tuple_(col(model.created_at), col(model.id)) < tuple_(*after))
    query = query.order_by(col(model.created_at).desc(), col(model.id).desc()).limit(search.count + 1)
    rows = list(session.exec(query).all())
    page = rows[: search.count]
    more = len(rows) > search.count
    return total, page, encode_cursor([page[-1].created_at.isoformat(), page[-1].id]) if more else None


def as_datetime(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SearchRefused(
            "_cursor", "is not one this server returned; follow the Bundle's next link"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def searchset(
    base: str,
    resource_type: str,
    search: Search,
    total: int,
    matches: list[dict[str, Any]],
    next_cursor: str | None,
    included: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """The `searchset` Bundle of one page: `total` all matches, `self` what was applied, `next` the page after."""
    query = [*search.applied, ("_count", str(search.count))]
    url = f"{base}/{resource_type}"
    links = [{"relation": "self", "url": f"{url}?{urlencode(query)}"}]
    if next_cursor is not None:
        links.append({"relation": "next", "url": f"{url}?{urlencode([*query, ('_cursor', next_cursor)])}"})

    def entry(resource: dict[str, Any], mode: str) -> dict[str, Any]:
        return {"fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}", "resource": resource,
                "search": {"mode": mode}}  # fmt: skip

    entries = [entry(r, "match") for r in matches] + [entry(r, "include") for r in included]
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": total, "link": links}
    return {**bundle, "entry": entries} if entries else bundle  # FHIR JSON has no empty arrays


def search_params_of(params: Iterable[SearchParam]) -> list[dict[str, str]]:
    return [p.declared() for p in params]
