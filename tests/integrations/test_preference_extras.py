"""Every extra installs on the Python versions the project claims (requires-python >= 3.10).

The release data below was read from the wheels' Requires-Python (pip download --no-deps
--python-version 3.10 --only-binary=:all:): flwr 1.31+ and trl 1.15+ require Python >= 3.11.
"""

from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

packaging = pytest.importorskip("packaging.requirements")
from packaging.version import Version  # noqa: E402

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
#: first release of a package that needs Python >= 3.11
NEEDS_311 = {"flwr": Version("1.31"), "trl": Version("1.15")}


def extras():
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def active(reqs, python):
    env = {"python_version": python, "python_full_version": python + ".0"}
    out = [packaging.Requirement(r) for r in reqs]
    return [r for r in out if r.marker is None or r.marker.evaluate(env)]


def test_project_claims_310():
    assert tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"] == ">=3.10"


@pytest.mark.parametrize("extra", sorted(extras()))
def test_no_extra_asks_python_310_for_a_release_that_needs_311(extra):
    for r in active(extras()[extra], "3.10"):
        if r.name in NEEDS_311:
            first = NEEDS_311[r.name]
            allowed = [v for v in ("1.8", "1.14", "1.16", "1.30", "1.42") if Version(v) in r.specifier]
            assert allowed and all(Version(v) < first for v in allowed), (extra, str(r))


def test_flower_and_trl_resolve_as_documented():
    # losskit.integrations.flower is written against Flower 1.42 (Python >= 3.11): nothing on 3.10
    assert active(extras()["flower"], "3.10") == []
    (flwr,) = active(extras()["flower"], "3.12")
    assert flwr.name == "flwr" and Version("1.42.0") in flwr.specifier and Version("1.43") not in flwr.specifier
    # the simulation engine: the same Flower series with its Ray extra
    assert active(extras()["simulation"], "3.10") == []
    (sim,) = active(extras()["simulation"], "3.12")
    assert sim.name == "flwr" and sim.extras == {"simulation"} and sim.specifier == flwr.specifier
    assert active(extras()["trl"], "3.10") == []
    assert sorted(r.name for r in active(extras()["trl"], "3.11")) == ["transformers", "trl"]
