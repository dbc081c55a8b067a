"""README and recipes stay true to the code: the Quickstart block, and every recipe parses."""
import re
from importlib.metadata import requires

import pytest

from posttrain.config import load_recipe

from conftest import REPO


def _quickstart_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"^## Quickstart\n.*?^```bash\n(.*?)^```", text, re.S | re.M)
    assert block, "README has no ```bash block under '## Quickstart'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_block_is_two_commands():
    first, second = _quickstart_commands()  # exactly two
    assert "posttrain train recipes/quickstart.yaml" in first and "torch==2.13.0" in first
    assert "pytest" in second and "torch==2.13.0" in second


def test_quickstart_installs_the_pinned_set():
    """Both commands install with `-c .ci/constraints.txt`, which pins every dependency pyproject names (the test
    extra included) inside pyproject's range, and leaves torch (pinned on the command line) and posttrain out."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    assert all("-c .ci/constraints.txt" in line for line in _quickstart_commands())
    pins = {}
    for line in (REPO / ".ci/constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    assert "torch" not in pins and "posttrain" not in pins
    for line in requires("posttrain"):                   # pyproject's dependencies and extras, as installed
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name != "torch" and (req.marker is None or req.marker.evaluate({"extra": "test"})):
            assert name in pins, f"{name} is not pinned in .ci/constraints.txt"
            assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside pyproject's {req.specifier}"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci/run").read_text()
    assert "sed -n 2p" in ci and "## Quickstart" in ci  # .ci/run executes README's second command verbatim


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml")), ids=str)
def test_every_recipe_parses(path):
    recipe = load_recipe(REPO / path)
    assert recipe.stages


def test_readme_recipe_anatomy_is_a_valid_recipe():
    import yaml

    from posttrain.config import parse_recipe

    text = (REPO / "README.md").read_text()
    block = re.search(r"^## Recipe anatomy\n.*?^```yaml\n(.*?)^```", text, re.S | re.M)
    assert block, "README has no ```yaml block under '## Recipe anatomy'"
    recipe = parse_recipe(yaml.safe_load(block.group(1)), "README.md")
    assert [s.name for s in recipe.stages] == ["sft", "grpo"]
