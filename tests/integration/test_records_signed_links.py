"""Signed links (services.auth.signed_links, services.records.links) used as a browser and an EHR use them: a
partner's key mints links to one instance, then plain GETs with no Authorization header (an `<img src>`, a
`<video src>` seeking with Range, a WADO-URI link) read it from the real records service served by uvicorn."""

from __future__ import annotations

import io
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import requests
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.auth import access, audit, signed_links, smart, tenancy
from services.auth.keys import key_id_of
from services.auth.partners import revoke_key
from services.auth.read_windows import ReadWindows
from services.common.config import Settings
from services.common.db import get_engine
from services.common.logging import NoLinkSignatures
from tests.integration.test_records_dicomweb import instances, new_study
from tests.integration.test_records_rendered import (  # noqa: F401 - the fixtures
    BASE,
    _base,
    base_url,
    engine,
    gradient,
    new_partner,
    stored,
    url_of,
    wado_params,
)
from tests.integration.test_records_rendered_video import h264_instance, h264_stream
from tests.integration.test_smart_backend_services import new_key
from tests.keys import specialist_headers

BROWSER_IMG = {"Accept": "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"}


def owned_case(records: Engine, settings: Settings, *datasets: Any) -> tuple[str, dict[str, str]]:
    """A case holding `datasets`, owned by a new partner, and that partner's key."""
    case_id, _ = stored(records, settings, *datasets)
    partner, key = new_partner()
    tenancy.register_owner(get_engine("auth"), case_id, partner)
    return case_id, key


def mint(case_id: str, ds: Any, key: dict[str, str], **body: Any) -> requests.Response:
    return requests.post(f"{url_of(case_id, ds)}/links", json=body or None, headers=key, timeout=10)


def key_id(key: dict[str, str]) -> str:
    return str(key_id_of(key["Authorization"].removeprefix("Bearer ")))


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query)) | changes
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query)}"


def test_links_read_the_instance_without_a_key_as_the_key_does_and_are_audited_as_links(
    engine: Engine,  # noqa: F811
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    windows = ReadWindows(600)
    monkeypatch.setattr(access, "get_read_windows", lambda: windows)
    study = new_study()
    ramp, cine = gradient(study), instances(study)[2]
    case_id, key = owned_case(engine, settings, ramp, cine)

    minted = mint(case_id, ramp, key, accept="image/png", viewport="32,32")
    assert minted.status_code == 200, minted.text
    links = minted.json()
    assert links["key_id"] == key_id(key) and 0 < links["expires_in"] <= 300 and links["mp4"] is None

    rendered = requests.get(links["rendered"], headers=BROWSER_IMG, timeout=10)  # an <img src>: no key
    keyed = requests.get(
        f"{url_of(case_id, ramp)}/rendered",
        params={"accept": "image/png", "viewport": "32,32"},
        headers=key,
        timeout=10,
    )
    assert rendered.status_code == 200 and rendered.headers["content-type"] == "image/png"
    assert rendered.content == keyed.content and Image.open(io.BytesIO(rendered.content)).size == (32, 32)
    max_age = int(rendered.headers["cache-control"].removeprefix("private, max-age="))
    assert 0 < max_age <= links["expires_in"]
    assert rendered.headers["referrer-policy"] == "no-referrer"

    thumbnail = requests.get(links["thumbnail"], headers=BROWSER_IMG, timeout=10)
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"
    assert (
        thumbnail.content
        == requests.get(
            f"{url_of(case_id, ramp)}/thumbnail",
            params={"accept": "image/png", "viewport": "32,32"},
            headers=key,
            timeout=10,
        ).content
    )

    head = requests.head(links["thumbnail"], timeout=10)  # a HEAD is the GET's headers: the link serves it
    assert (head.status_code, head.headers["content-type"], head.content) == (200, "image/png", b"")

    frames = requests.get(links["frames"], headers={"Accept": "multipart/related; type=*/*"}, timeout=10)
    assert frames.status_code == 200 and ramp.PixelData in frames.content

    wado = requests.get(links["wado_uri"], timeout=10)  # an EHR's link: JPEG, the image's default
    assert wado.status_code == 200 and wado.headers["content-type"] == "image/jpeg"
    assert (
        wado.content
        == requests.get(f"{BASE[0]}/dicomweb/wado", params=wado_params(ramp), headers=key, timeout=10).content
    )

    dicom = mint(case_id, cine, key, wado_content_type="application/dicom").json()
    assert (
        requests.get(dicom["wado_uri"], timeout=10).content
        == requests.get(
            url_of(case_id, cine), headers={"Accept": "application/dicom", **key}, timeout=10
        ).content
    )

    entries = [
        e
        for e in audit.entries(get_engine("auth"), case_id=case_id, limit=10_000)
        if ramp.SOPInstanceUID in e.detail and e.action == "read"
    ]
    by_link = [e for e in entries if "via signed link" in e.detail]
    assert len(by_link) == 1 and by_link[0].actor == f"key:{key_id(key)}" and by_link[0].outcome == "success"
    assert all("sig=" not in e.detail and "sig" not in e.resource for e in entries)


def test_an_mp4_link_plays_and_seeks_with_range(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    study = new_study()
    clip = h264_instance(study, h264_stream())
    case_id, key = owned_case(engine, settings, clip)
    links = mint(case_id, clip, key).json()

    whole = requests.get(
        f"{url_of(case_id, clip)}/rendered", headers={"Accept": "video/mp4", **key}, timeout=10
    )
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
    for url in (links["mp4"], links["rendered"]):
        played = requests.get(url, timeout=10)  # a <video src>: no key
        assert played.status_code == 200 and played.content == whole.content
        seek = requests.get(url, headers={"Range": "bytes=100-599"}, timeout=10)
        assert seek.status_code == 206 and seek.content == whole.content[100:600]
        assert seek.headers["content-range"] == f"bytes 100-599/{len(whole.content)}"
    wado = mint(case_id, clip, key, wado_content_type="video/mp4").json()["wado_uri"]
    part = requests.get(wado, headers={"Range": "bytes=0-99"}, timeout=10)
    assert part.status_code == 206 and part.content == whole.content[:100]


def test_a_webm_link_plays_a_cine_stored_as_frames_in_a_video_element_without_a_key(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    """A <video src> sends `Accept: */*` and no key: the cine's `webm` link answers its WebM (its `rendered`
    link, as for any image, its first frame); a single image has no WebM link."""
    study = new_study()
    image, cine = instances(study)[0], instances(study)[2]
    case_id, key = owned_case(engine, settings, image, cine)
    links = mint(case_id, cine, key).json()
    assert links["mp4"] is None and mint(case_id, image, key).json()["webm"] is None

    whole = requests.get(
        f"{url_of(case_id, cine)}/rendered", headers={"Accept": "video/webm", **key}, timeout=30
    )
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/webm"
    played = requests.get(links["webm"], headers={"Accept": "*/*"}, timeout=30)
    assert played.status_code == 200 and played.headers["content-type"] == "video/webm"
    assert played.content == whole.content
    seek = requests.get(links["webm"], headers={"Range": "bytes=10-99"}, timeout=10)
    assert seek.status_code == 206 and seek.content == whole.content[10:100]
    wado = mint(case_id, cine, key, wado_content_type="video/webm").json()["wado_uri"]
    assert requests.get(wado, timeout=30).content == whole.content


def test_expired_changed_and_revoked_links_are_refused_saying_why(
    engine: Engine,  # noqa: F811
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study = new_study()
    ramp, other = gradient(study), instances(study)[0]
    case_id, key = owned_case(engine, settings, ramp, other)
    links = mint(case_id, ramp, key).json()
    rendered = links["rendered"]

    def refused(url: str) -> tuple[int, str]:
        got = requests.get(url, timeout=10)
        assert got.headers["content-type"] == "application/problem+json", got.text
        return got.status_code, got.json()["detail"]

    path = urlsplit(rendered).path
    past = signed_links.sign(path, {}, key_id(key), int(time.time()) - 1, signed_links.get_link_settings())
    status, detail = refused(f"{BASE[0]}{path}?{past}")
    assert status == 401 and "expired" in detail

    another = rendered.replace(ramp.SOPInstanceUID, other.SOPInstanceUID)
    status, detail = refused(another)
    assert status == 403 and "issued for another path" in detail
    status, detail = refused(with_query(rendered, viewport="512,512"))
    assert status == 403 and "signature does not match" in detail
    status, detail = refused(with_query(rendered, exp=str(int(time.time()) + 86_400)))
    assert status == 403 and "signature does not match" in detail
    status, detail = refused(with_query(links["wado_uri"], objectUID=other.SOPInstanceUID))
    assert status == 403 and "signature does not match" in detail
    status, detail = refused(rendered.split("&sig=")[0])
    assert status == 401 and "incomplete" in detail

    too_long = mint(case_id, ramp, key, expires_in=3600)
    assert too_long.status_code == 400 and "at most 300" in too_long.json()["detail"]
    short = mint(case_id, ramp, key, expires_in=30).json()
    assert short["expires_in"] == 30
    assert int(requests.get(short["thumbnail"], timeout=10).headers["cache-control"].split("=")[1]) <= 30

    # Another partner cannot mint links to a case it cannot see.
    _, theirs = new_partner()
    assert mint(case_id, ramp, theirs).status_code == 404

    # Rotation: a link signed with the previous secret still reads.
    old = signed_links.get_link_settings()
    rotated = signed_links.SignedLinkSettings(secret="n" * 40, previous_secret=old.secret)
    monkeypatch.setattr(signed_links, "get_link_settings", lambda: rotated)
    assert requests.get(rendered, timeout=10).status_code == 200
    gone = signed_links.SignedLinkSettings(secret="n" * 40)
    monkeypatch.setattr(signed_links, "get_link_settings", lambda: gone)
    assert refused(rendered)[0] == 403
    monkeypatch.setattr(signed_links, "get_link_settings", lambda: old)

    with Session(get_engine("auth")) as session:
        revoke_key(session, key_id(key))
        session.commit()
    status, detail = refused(rendered)
    assert status == 401 and "revoked" in detail


def test_a_specialist_mints_links_to_a_case_offered_to_them_and_they_stop_when_it_no_longer_is(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    study = new_study()
    ramp = gradient(study)
    case_id, _ = stored(engine, settings, ramp)
    specialist = specialist_headers(settings, "spec-links-1")
    assert mint(case_id, ramp, specialist).status_code == 404  # not offered to them yet

    def standing(may_read: bool) -> Any:
        return lambda: tenancy.ReviewerStanding(may_read, "offered" if may_read else "declined")

    tenancy.settle_reviewer(get_engine("auth"), case_id, "spec-links-1", standing(True), service="review")
    minted = mint(case_id, ramp, specialist)
    assert minted.status_code == 200, minted.text
    link = minted.json()["thumbnail"]
    assert requests.get(link, timeout=10).status_code == 200
    [issued] = [
        e
        for e in audit.entries(get_engine("auth"), case_id=case_id, limit=10_000)
        if e.detail.endswith("signed links to it issued")
    ]
    assert issued.action == "read" and issued.actor == f"key:{key_id(specialist)}"

    tenancy.settle_reviewer(get_engine("auth"), case_id, "spec-links-1", standing(False), service="review")
    lost = requests.get(link, timeout=10)  # answered as the key's own read now is: the case is not visible
    assert lost.status_code == 404 and lost.headers["content-type"] == "application/problem+json"


def test_a_smart_token_with_read_scope_mints_links_that_stop_with_its_client(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    study = new_study()
    ramp = gradient(study)
    case_id, _ = stored(engine, settings, ramp)
    partner, _ = new_partner()
    tenancy.register_owner(get_engine("auth"), case_id, partner)
    with Session(get_engine("auth"), expire_on_commit=False) as session:
        client = smart.register_client(
            session, partner, {"keys": [new_key("ES384").jwk()]}, "system/ImagingStudy.read"
        )
        session.commit()
    issued = smart.issue_token(get_engine("auth"), client, "system/ImagingStudy.read", datetime.now(UTC))
    token = {"Authorization": f"Bearer {issued.access_token}"}

    minted = mint(case_id, ramp, token)  # a read scope mints: the links only read
    assert minted.status_code == 200, minted.text
    assert minted.json()["key_id"].startswith("token:")
    link = minted.json()["thumbnail"]
    assert requests.get(link, timeout=10).status_code == 200

    with Session(get_engine("auth")) as session:
        smart.revoke_client(session, client.id)
        session.commit()
    refused = requests.get(link, timeout=10)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]


def test_the_signature_is_not_in_logs_spans_or_audit_entries(
    engine: Engine,  # noqa: F811
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    study = new_study()
    ramp = gradient(study)
    case_id, key = owned_case(engine, settings, ramp)
    links = mint(case_id, ramp, key).json()
    signature = dict(parse_qsl(urlsplit(links["rendered"]).query))["sig"]

    caplog.set_level(logging.DEBUG)
    assert requests.get(links["rendered"], timeout=10).status_code == 200
    assert requests.get(with_query(links["rendered"], window="1,2"), timeout=10).status_code == 403
    assert requests.get(links["rendered"] + "&viewport=1", timeout=10).status_code == 403
    served = [r for r in caplog.records if not r.name.startswith("urllib3")]  # urllib3: the browser's side
    logged = "\n".join(r.getMessage() for r in served) + capsys.readouterr().out
    assert signature not in logged
    spans = exporter.get_finished_spans()
    assert spans and all(
        signature not in span.name and signature not in str(dict(span.attributes or {})) for span in spans
    )
    assert all(
        signature not in e.detail + e.resource
        for e in audit.entries(get_engine("auth"), limit=10_000)
        if e.case_id in (case_id, None)
    )


def test_a_log_line_quoting_a_link_shows_no_signature() -> None:
    """Uvicorn's access log is off (services.common.runner); turned on, its line quotes the URL."""
    line = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("10.0.0.1:5000", "GET", "/dicomweb/wado?exp=1&kid=k&ph=p&sig=SECRETsig-_1&studyUID=1", "1.1", 200),
        None,
    )  # fmt: skip
    NoLinkSignatures().filter(line)
    assert "SECRETsig" not in line.getMessage() and "sig=REDACTED&studyUID=1" in line.getMessage()
