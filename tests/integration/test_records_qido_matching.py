"""QIDO-RS Empty Value Matching and Multiple Value Matching (PS3.18 8.3.4.5, 8.3.4.6), asked for as a
DICOMweb client asks (`dicomweb-client`'s search functions) and by plain HTTP, against the real records
service. Before, both parameters were ignored with a general "not supported as query keys" Warning, and the
answer was the unfiltered list."""

from __future__ import annotations

import io

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy.engine import Engine

from services.common.config import Settings
from tests.dicom_factory import make_us_instance
from tests.integration.test_records_dicomweb import (  # noqa: F401 - the fixtures
    base_url,
    engine,
    new_study,
    open_case,
)
from tests.keys import operations_headers

EMPTY = {"emptyvaluematching": "true"}
MULTIPLE = {"multiplevaluematching": "true"}


def image(study: str, **attributes: str | None) -> pydicom.Dataset:
    ds = pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1")))
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def uids(found: list[dict[str, object]]) -> set[str]:
    return {f["0020000D"]["Value"][0] for f in found}  # type: ignore[index]


def test_empty_and_multiple_value_matching_are_honoured(
    base_url: str,  # noqa: F811
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    case_id = open_case(engine, settings)
    root = f"{base_url}/dicomweb/cases/{case_id}"
    headers = operations_headers(settings)
    client = DICOMwebClient(url=root, headers=headers)
    january, march, undated = new_study(), new_study(), new_study()
    # Study Date and Instance Number are Type 2: present and empty when the modality did not know them.
    numbered, unnumbered = image(undated, StudyDate=""), image(undated, StudyDate="", InstanceNumber="")
    client.store_instances(
        [image(january, StudyDate="20260105"), image(march, StudyDate="20260301"), numbered, unnumbered]
    )
    accession = client.search_for_studies()[0]["00080050"]["Value"][0]

    # Empty Value Matching: "" is the attribute empty or absent.
    found = client.search_for_studies(search_filters={"StudyDate": '""'}, additional_params=EMPTY)
    assert uids(found) == {undated}
    [bare] = client.search_for_instances(
        undated, search_filters={"InstanceNumber": '""'}, additional_params=EMPTY
    )
    assert bare["00080018"]["Value"] == [unnumbered.SOPInstanceUID]
    assert client.search_for_studies(search_filters={"AccessionNumber": '""'}, additional_params=EMPTY) == []
    # Without the parameter "" is a value like any other: no study is dated so.
    literal = requests.get(f"{root}/studies", params={"StudyDate": '""'}, headers=headers, timeout=10)
    assert literal.status_code == 200 and literal.json() == []

    # Multiple Value Matching: any of a list, separated by commas or backslashes.
    dates = {"StudyDate": "20260105,20260301"}
    assert uids(client.search_for_studies(search_filters=dates, additional_params=MULTIPLE)) == {
        january,
        march,
    }
    assert uids(
        client.search_for_studies(
            search_filters={"StudyDate": "20260101-20260131\\20260301"}, additional_params=MULTIPLE
        )
    ) == {january, march}
    assert client.search_for_studies(search_filters=dates) == []  # one value, no study on it
    both = client.search_for_studies(
        search_filters={"AccessionNumber": f"NOT-OURS,{accession}"}, additional_params=MULTIPLE
    )
    assert len(both) == 3

    plain = requests.get(
        f"{root}/studies",
        params={
            "StudyDate": "20260105,20260301",
            "multiplevaluematching": "true",
            "emptyvaluematching": "false",
        },
        headers=headers,
        timeout=10,
    )
    assert plain.status_code == 200 and uids(plain.json()) == {january, march}
    assert "Warning" not in plain.headers  # honoured: nothing to warn of
    bad = requests.get(f"{root}/studies", params={"emptyvaluematching": "yes"}, headers=headers, timeout=10)
    assert bad.status_code == 400 and "true or false" in bad.json()["detail"]
