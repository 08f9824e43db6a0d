"""The Dockerfile, checked statically (these machines have no Docker engine to build it): multi-stage,
a slim base, build tools only in the build stage, a non-root user, one image for every process."""

from __future__ import annotations

import re

from tests.deploy.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "libpq-dev", "python3-dev")


def stages() -> list[list[str]]:
    lines = [line.strip() for line in DOCKERFILE.replace("\\\n", " ").splitlines()]
    result: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            result.append([])
        if result and line and not line.startswith("#"):
            result[-1].append(line)
    return result


def base_image(stage: list[str]) -> str:
    image = stage[0].split()[1]
    arg = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE)
    return arg.group(1) if image == "${PYTHON_IMAGE}" and arg else image


def test_multi_stage_on_a_slim_base() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    assert all("slim" in base_image(stage) for stage in all_stages)
    assert "COPY --from=build" in "\n".join(all_stages[-1])


def test_build_tools_stay_in_the_build_stage() -> None:
    *build, final = stages()
    assert any(tool in line for stage in build for line in stage for tool in BUILD_TOOLS)
    final_text = "\n".join(final)
    assert "apt-get install" not in final_text
    assert not any(tool in final_text.split() for tool in BUILD_TOOLS)


def test_final_stage_runs_as_a_non_root_user() -> None:
    final = stages()[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-zero uid, so runAsNonRoot can verify it"


def test_one_image_runs_every_process() -> None:
    final = "\n".join(stages()[-1])
    for package in ("contracts", "services", "workflows"):
        assert f"COPY {package} ./{package}" in final
    assert 'CMD ["python", "-m", "services.intake.main"]' in final
    assert "PYTHONDONTWRITEBYTECODE=1" in final and "HOST=0.0.0.0" in final


def test_dockerignore_keeps_local_state_out() -> None:
    rules = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "**", "ignore everything, then allow what the image needs"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "constraints.txt", "README.md", "contracts", "services", "workflows"}
