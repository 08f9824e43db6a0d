"""A 1 GiB study (eight 128 MiB cine clips) imported with bounded memory: the import runs in a child
process whose peak resident set size is measured; files stream through disk, headers are read without
pixel data. About 20-40 s on the CI machines, so it runs by default."""

import json
import os
import subprocess
import sys
import uuid
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CollectRecords, Exam, Patient, new_event
from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.records import consumer
from services.records.models import RecordFile
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance

CLIPS, FRAMES, SIDE = 8, 2048, 256  # 8 x 2048 x 256 x 256 bytes = 1 GiB of pixel data
PEAK_LIMIT_MIB = 400

IMPORT = """
import json, sys
from sqlmodel import Session
from services.common.config import get_settings
from services.common.db import make_engine
from services.records import uploads
settings = get_settings()
case_id, paths = sys.argv[1], sys.argv[2:]
streams = [open(p, "rb") for p in paths]
with Session(make_engine("records", settings), expire_on_commit=False) as session:
    outcome = uploads.accept_upload(
        case_id, [uploads.IncomingFile(s, "application/dicom") for s in streams], session, settings
    )
# VmHWM belongs to this process image; ru_maxrss would carry the forking test process's peak over exec.
status = open("/proc/self/status").read().splitlines()
peak_kib = int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
print(json.dumps({"new_files": outcome.new_files, "peak_mib": peak_kib // 1024}))
"""


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)
    return engine


def test_a_one_gib_study_imports_with_bounded_memory(
    engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    case_id = str(uuid.uuid4())
    command = CollectRecords(
        case_id=case_id,
        patient=Patient(
            family_name="Doe",
            given_name="Jane",
            birth_date=date(1980, 1, 1),
            sex="female",
            mrn="MRN1",
            state="CA",
        ),
        exam=Exam(exam_type="obstetric", performed_on=date(2026, 11, 20), facility="Bayview"),
    )
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=command, subject=case_id), settings
        )
        session.commit()
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    paths = []
    for index in range(CLIPS):
        path = tmp_path / f"CINE{index}.dcm"
        make_us_instance(path, study_uid=study, series_uid=study + ".1", frames=FRAMES, rows=SIDE, cols=SIDE)
        paths.append(path)
    total = sum(p.stat().st_size for p in paths)
    assert total > 1024**3

    try:
        child = subprocess.run(
            [sys.executable, "-c", IMPORT, case_id, *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "LOG_LEVEL": "WARNING"},
            check=False,
        )
        assert child.returncode == 0, child.stderr[-2000:]
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"imported {total >> 20} MiB with a peak RSS of {result['peak_mib']} MiB")
        assert result["new_files"] == CLIPS
        assert result["peak_mib"] < PEAK_LIMIT_MIB, (
            f"peak RSS {result['peak_mib']} MiB for a {total >> 20} MiB study"
        )
        with Session(engine) as session:
            rows = session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all()
        assert sorted(r.number_of_frames or 0 for r in rows) == [FRAMES] * CLIPS
    finally:
        store = ObjectStore.for_settings(settings)
        with Session(engine) as session:
            for row in session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all():
                store.path(row.storage_path).unlink(missing_ok=True)
        for path in paths:
            path.unlink(missing_ok=True)
