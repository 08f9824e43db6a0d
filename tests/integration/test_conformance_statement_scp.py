"""The conformance statement's SCP section, held to a real association: our SCP, started as the records
process starts it (storage commitment and Query/Retrieve on), accepts each SOP class in each transfer syntax
the statement lists, rejects what it does not list, and treats calling AE titles as it says. The lists come
from the very function the statement is rendered from (`scripts.conformance_statement.scp_contexts`)."""

import io
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.uid import JPEGLSLossless, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelFind,
    UltrasoundImageStorage,
    Verification,
)

from scripts.conformance_statement import scp_contexts
from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.common.dicom_identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from services.records import dimse
from services.records.commitment_scp import CommitmentLoop
from services.records.qr_scp import QueryRetrieve, QueryRetrieveSettings, Workstation
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.infra import free_ports

WORKSTATION = "CONFORMANCE_WS"
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2: odd IDs 1 to 255)
ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x03, 0x04


@pytest.fixture(scope="module")
def scp(settings: Settings) -> Iterator[tuple[int, dimse.StoreSCP]]:
    records, auth = make_engine("records", settings), make_engine("auth", settings)
    migrate.upgrade("records", records)
    migrate.upgrade("auth", auth)
    options = QueryRetrieveSettings(
        workstations=[Workstation(ae_title=WORKSTATION, host="127.0.0.1", role="operations")]
    )
    port = free_ports(("scp",))["scp"]
    server = dimse.StoreSCP(
        ObjectStore.for_settings(settings),
        port,
        settings.max_upload_bytes,
        commitment=CommitmentLoop(records, settings).handlers(lambda event: 0x0000),
        query_retrieve=QueryRetrieve(records, auth, settings, options),
    )
    server.start()
    try:
        yield port, server
    finally:
        server.stop()


def associate(port: int, contexts: list[PresentationContext], calling: str = WORKSTATION) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.requested_contexts = contexts
    return ae.associate("127.0.0.1", port, ae_title=dimse.OUR_AE)


def test_the_scp_serves_exactly_the_contexts_the_statement_lists(scp: tuple[int, dimse.StoreSCP]) -> None:
    _, server = scp

    def described(contexts: list[PresentationContext]) -> list[tuple[str, list[str], bool, bool]]:
        return [(str(c.abstract_syntax), list(c.transfer_syntax), c.scu_role, c.scp_role) for c in contexts]

    [listener] = server._servers
    assert described(listener.ae.supported_contexts) == described(scp_contexts())


def test_every_listed_sop_class_is_accepted_in_every_listed_transfer_syntax(
    scp: tuple[int, dimse.StoreSCP],
) -> None:
    port, _ = scp
    pairs = [(str(c.abstract_syntax), str(s)) for c in scp_contexts() for s in c.transfer_syntax]
    accepted: set[tuple[str, str]] = set()
    for start in range(0, len(pairs), MAX_CONTEXTS):
        batch = pairs[start : start + MAX_CONTEXTS]
        assoc = associate(port, [build_context(sop_class, syntax) for sop_class, syntax in batch])
        assert assoc.is_established, f"association for contexts {start} to {start + len(batch)} not accepted"
        try:
            # The statement's section 10: the acceptor names our implementation, not pynetdicom's.
            assert (assoc.acceptor.implementation_class_uid, assoc.acceptor.implementation_version_name) == (
                IMPLEMENTATION_CLASS_UID,
                IMPLEMENTATION_VERSION_NAME,
            )
            accepted |= {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
            assert not assoc.rejected_contexts
        finally:
            assoc.release()
    assert accepted == set(pairs)


def test_what_the_statement_does_not_list_is_rejected(scp: tuple[int, dimse.StoreSCP]) -> None:
    port, _ = scp
    listed = {str(c.abstract_syntax): [str(s) for s in c.transfer_syntax] for c in scp_contexts()}
    for unlisted in (ModalityWorklistInformationFind, ModalityPerformedProcedureStep):
        assert unlisted not in listed
    assert JPEGLSLossless not in listed[UltrasoundImageStorage]
    assoc = associate(
        port,
        [
            build_context(Verification),
            build_context(ModalityWorklistInformationFind),
            build_context(ModalityPerformedProcedureStep),
            build_context(UltrasoundImageStorage, JPEGLSLossless),
        ],
    )
    assert assoc.is_established
    try:
        assert [str(c.abstract_syntax) for c in assoc.accepted_contexts] == [Verification]
        results = {str(c.abstract_syntax): c.result for c in assoc.rejected_contexts}
        assert results == {
            ModalityWorklistInformationFind: ABSTRACT_SYNTAX_NOT_SUPPORTED,
            ModalityPerformedProcedureStep: ABSTRACT_SYNTAX_NOT_SUPPORTED,
            UltrasoundImageStorage: TRANSFER_SYNTAXES_NOT_SUPPORTED,
        }
    finally:
        assoc.release()


def test_query_retrieve_only_from_a_configured_workstation_storage_from_any_ae(
    scp: tuple[int, dimse.StoreSCP],
) -> None:
    """As 3.3 says: a Q/R context from another calling AE rejects the association; C-STORE is accepted from
    any AE, and an instance no C-MOVE of ours awaits is refused 0124H."""
    port, _ = scp
    refused = associate(port, [build_context(StudyRootQueryRetrieveInformationModelFind)], calling="ANY_PACS")
    assert refused.is_rejected
    rejection = refused.acceptor.primitive
    # Rejected (permanent), by the service user: calling AE title not recognised.
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x03)

    assoc = associate(
        port, [build_context(CTImageStorage), build_context(UltrasoundImageStorage)], "ANY_PACS"
    )
    assert assoc.is_established
    try:
        made = make_us_instance(None, study_uid=generate_uid(), series_uid=generate_uid())
        instance = pydicom.dcmread(io.BytesIO(made))
        status = assoc.send_c_store(instance)
        assert int(status.Status) == dimse.NOT_AUTHORIZED
    finally:
        assoc.release()
