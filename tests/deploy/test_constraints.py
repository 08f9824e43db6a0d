"""constraints.txt pins what every install takes (make install, CI, the image), so a release upstream cannot
change a build that changed nothing; a dependency added to pyproject.toml without `make lock` is caught."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.conftest import ROOT


def pins() -> dict[str, str]:
    result: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{line!r}: every line pins one exact version (name==version)"
        result[canonicalize_name(name)] = version
    return result


def test_every_dependency_and_dev_tool_is_pinned_to_a_version_it_allows() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [
        *project["dependencies"],
        *(r for group in project["optional-dependencies"].values() for r in group),
    ]
    pinned = pins()
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pinned, (
            f"{requirement.name} is not in constraints.txt: run `make lock`, then `make test`"
        )
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pinned[name]}, which pyproject.toml's "
            f"{requirement.specifier} does not allow: run `make lock`"
        )


def test_every_install_takes_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -c constraints.txt -e '.[dev,video]'" in makefile
    assert "$(STAMP): pyproject.toml constraints.txt" in makefile, "a changed pin reinstalls"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'pip install -c constraints.txt ".${EXTRAS:+[$EXTRAS]}"' in dockerfile  # EXTRAS=video: PyAV
    assert "constraints.txt" in dockerfile.split("RUN pip install")[0], "copied before the install"


def test_the_test_client_runs_on_the_transport_starlette_supports() -> None:
    """starlette's TestClient warns on httpx that its support is going away; with httpx2 installed it uses that."""
    import starlette.testclient

    assert starlette.testclient.httpx.__name__ == "httpx2", "pip install -c constraints.txt -e '.[dev]'"
