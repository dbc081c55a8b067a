"""Packaging: pyproject's package list matches the tree; the Dockerfile parses, and its pins are pyproject's
dependencies at the versions the tests run with.

No container engine can build the image here (Docker is absent; Debian's buildah installs and runs, but the base
image nvidia/cuda cannot be pulled without access to a container registry), so the Dockerfile is checked as text.
"The tested versions" are `.ci/constraints.txt` when it exists (the pins CI installs), else the versions installed
in this environment; vLLM's is `.ci/vllm-env.sh`'s, the one the vLLM suite runs.
"""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

INSTRUCTIONS = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "CMD", "ENTRYPOINT", "EXPOSE", "LABEL", "USER",
                "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}
NOT_PINNED = {"torch"}          # the image takes the CUDA build of torch that vLLM pins (Dockerfile comment)


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per instruction: comments dropped, `\\` continuations joined."""
    lines, current = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip().removesuffix("\\") + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            lines.append(current)
            current = ""
    assert not current, "Dockerfile ends inside a continued line"
    out = []
    for line in lines:
        word, _, args = line.strip().partition(" ")
        assert word.upper() in INSTRUCTIONS and word == word.upper(), f"Dockerfile: unknown instruction {word!r}"
        out.append((word, " ".join(args.split())))
    return out


def docker_pins() -> dict[str, str]:
    pins = {}
    for word, args in dockerfile():
        if word == "RUN" and "pip install" in args:
            for name, ver in re.findall(r"(?<![\w.-])([A-Za-z0-9][\w.-]*)==([\w.+!-]+)", args):
                pins[canonicalize_name(name)] = ver
    return pins


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _tested_versions() -> dict[str, str]:
    constraints = REPO / ".ci/constraints.txt"
    if constraints.is_file():                                       # the pins CI installs
        out = {}
        for line in constraints.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                req = Requirement(line)
                (spec,) = req.specifier
                out[canonicalize_name(req.name)] = spec.version
        return out
    out = {}
    for dep in pyproject()["project"]["dependencies"]:
        name = canonicalize_name(Requirement(dep).name)
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def test_dockerfile_parses_and_copies_what_exists():
    steps = dockerfile()
    assert steps[0][0] == "FROM" and steps[-1][0] == "CMD"
    for word, args in steps:
        if word == "COPY":
            *sources, _ = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"Dockerfile: COPY {src}: not in the repository"
    copied = {args.split()[0] for word, args in steps if word == "COPY"}
    assert {"posttrain", "rewards", "pyproject.toml"} <= copied       # rewards/ installs as posttrain.rewards


def test_dockerfile_pins_every_dependency_within_pyproject():
    pins = docker_pins()
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name in NOT_PINNED:
            assert name not in pins
            continue
        assert name in pins, f"Dockerfile does not pin {req.name} (a dependency in pyproject.toml)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"Dockerfile pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"


def test_dockerfile_pins_are_the_tested_versions():
    pins, tested = docker_pins(), _tested_versions()
    wrong = {name: (pin, tested[name]) for name, pin in pins.items() if name in tested and tested[name] != pin}
    assert not wrong, f"Dockerfile pins differ from the tested versions (pin, tested): {wrong}"
    vllm = re.search(r'^VLLM_VERSION="([^"]+)"', (REPO / ".ci/vllm-env.sh").read_text(), re.M).group(1)
    assert pins["vllm"] == vllm, f"Dockerfile pins vllm=={pins['vllm']}; the vLLM suite runs {vllm}"


def test_pyproject_lists_every_package():
    """`packages` is explicit (package-dir maps posttrain.rewards to rewards/): a new package must be added there."""
    setuptools = pyproject()["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "posttrain").rglob("__init__.py")}
    assert sorted(setuptools["packages"]) == sorted(found | {"posttrain.rewards"})
    assert setuptools["package-dir"] == {"posttrain.rewards": "rewards"}
    assert (REPO / "rewards/__init__.py").is_file()


@pytest.mark.parametrize("module", ["posttrain.rewards", "posttrain.rewards.sandbox", "posttrain.rewarding.worker"])
def test_installed_names_import(module):
    import importlib

    assert importlib.import_module(module).__file__.startswith(str(REPO))
