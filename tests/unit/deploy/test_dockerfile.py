"""deploy/docker: static checks of the one image (no Docker engine is needed to run them)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from services.common.settings import SERVICES, Settings

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
# BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile; the context is the repo root.
DOCKERIGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_runs_as_a_numeric_non_root_user() -> None:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) >= 1000
    assert not gid or (gid.isdigit() and int(gid) >= 1000)


def test_entrypoint_is_the_cli_and_the_arguments_pick_the_service() -> None:
    stage = dict(final_stage())
    assert json.loads(stage["ENTRYPOINT"]) == ["neurodissect"]
    command = json.loads(stage["CMD"])
    assert command[0] == "serve" and command[1] in SERVICES


def test_torch_is_the_cpu_build_by_default_and_pinned_like_the_project() -> None:
    args = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    assert args["TORCH_VARIANT"] == "cpu"
    text = DOCKERFILE.read_text()
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    pins = dict(
        dep.split("==") for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "dependencies"] if dep.startswith(("torch==", "torchvision=="))
    )
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]


def test_copied_sources_are_in_the_build_context() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    rules = [line for line in DOCKERIGNORE.read_text().splitlines()
             if line and not line.startswith("#")]
    # Everything is ignored but what the image needs.
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                assert source in allowed, f"{source} is excluded by {DOCKERIGNORE.name}"
                # README.md is the project's readme (pyproject), written with the docs.
                assert (ROOT / source).exists() or source == project["readme"], source


def test_image_environment_sets_only_settings_fields() -> None:
    names = set()
    for word, rest in final_stage():
        if word == "ENV":
            names |= set(re.findall(r"(\w+)=", rest))
    ours = {name for name in names if name.startswith("NEURODISSECT_") or name == "RAY_ADDRESS"}
    assert ours and ours <= set(Settings().environment())
