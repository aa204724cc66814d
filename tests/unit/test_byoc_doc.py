"""docs/byoc.md, command by command: what a reader types is what Zumik and the repository have.

Every fenced shell block is read as a shell would split it (continuation lines joined, quotes,
``&&``, ``;``, ``|`` and subshells; a quoted command given to ``ray exec`` or ``bash -c`` is read
too). For each command:

- a ``zumik ...`` command parses with Zumik's own command line (every subcommand, flag and
  value), and a profile it names loads;
- every repository file it names exists (``~/deploy/...`` is ``deploy/...``: the cluster
  launcher mounts it there);
- ``docker run`` publishes ports on loopback only; running Zumik, it runs the image the
  manifests name, keeps ``/var/lib/zumik`` in a volume and gives ``/dev/shm`` room for the
  profile's host tier;
- a ``python3 -c`` program compiles, and the model folder it fills is a profile's ``model.source``;
- the names it uses for KubeRay objects are the manifests' names, and the KubeRay operator's
  version is the one whose CRDs the manifests are checked against.

The checks can fail: bad snippets (a misspelt flag, a missing file, a port on every interface)
are refused by the same code.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from profiles import ProfileError, builtin_names, load_builtin, resolve_profile
from tests.support.manifests import kuberay_crd_dir
from zumik_serve.cli import _parser

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "byoc.md"
IMAGE = "ghcr.io/your-org/zumik:cuda"
DATA_DIR = "/var/lib/zumik"
OPERATORS = {"&&", "||", ";", "|", "(", ")", "&"}
REPO_PATH = re.compile(r"(?:^|[=/~])((?:deploy|docs|profiles|tests)/[\w./-]+|Dockerfile\.cuda)")


def _zumik_commands() -> set[str]:
    """Zumik's top-level subcommands (serve, tenant, ...)."""
    (action,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    zumik: list[list[str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    docker_runs: list[list[str]] = field(default_factory=list)


def shell_blocks(markdown: str) -> Iterator[str]:
    """The text of each fenced ``bash``/``sh``/``console`` block, its indentation removed."""
    for match in re.finditer(r"^( *)```(?:bash|sh|shell|console)\n(.*?)^\1```", markdown, re.M | re.S):
        indent = len(match.group(1))
        yield "\n".join(line[indent:] for line in match.group(2).splitlines())


def commands(block: str) -> Iterator[list[str]]:
    """Each simple command of a block as its tokens (continuations joined, comments dropped)."""
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        current: list[str] = []
        for token in [*tokens, ";"]:
            if token in OPERATORS:
                if current:
                    yield current
                current = []
            else:
                current.append(token)


def check_guide(markdown: str) -> Findings:
    findings = Findings()
    for block in shell_blocks(markdown):
        for tokens in commands(block):
            _check_command(tokens, findings)
    return findings


def zumik_argv(tokens: list[str]) -> list[str] | None:
    """The arguments of the ``zumik`` command in ``tokens`` (after ``docker exec zumik``,
    ``VAR=value`` and the like), or None."""
    known = _zumik_commands()
    for index, token in enumerate(tokens):
        if token == "zumik" and index + 1 < len(tokens) and tokens[index + 1] in known:
            return tokens[index + 1 :]
    return None


def _check_command(tokens: list[str], findings: Findings) -> None:
    argv = zumik_argv(tokens)
    if argv is not None:
        _check_zumik(argv, findings)
    for token in tokens:
        if " " in token and re.match(r"^[A-Za-z_][\w]*=|^(zumik|serve|ray|redis-server|sh) ", token):
            for inner in commands(token):  # a command handed to `ray exec` or `bash -c`
                _check_command(inner, findings)
        for path in REPO_PATH.findall(token):
            findings.paths.append(path)
            if not (REPO / path).exists():
                findings.problems.append(f"{' '.join(tokens)}: no file {path} in the repository")
    if tokens[:2] == ["docker", "run"]:
        findings.docker_runs.append(tokens)
        _check_docker_run(tokens, findings)
    if tokens[:2] == ["python3", "-c"] or "python3" in tokens and "-c" in tokens:
        _check_python(tokens, findings)
    if tokens[:2] == ["helm", "install"] and "--version" in tokens:
        _check_kuberay_version(tokens[tokens.index("--version") + 1], findings)
    _check_kuberay_names(tokens, findings)


def _check_zumik(argv: list[str], findings: Findings) -> None:
    findings.zumik.append(argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit:
        findings.problems.append(f"zumik {' '.join(argv)}: Zumik's command line refuses it")
        return
    profile = getattr(args, "profile", None)
    for name in [profile] if isinstance(profile, str) else profile or []:  # serve's may repeat
        try:
            resolve_profile(name)
        except ProfileError as exc:
            findings.problems.append(f"zumik {' '.join(argv)}: {exc}")


def _option_values(tokens: list[str], *names: str) -> list[str]:
    values = []
    for index, token in enumerate(tokens):
        for name in names:
            if token == name and index + 1 < len(tokens):
                values.append(tokens[index + 1])
            elif token.startswith(f"{name}="):
                values.append(token.split("=", 1)[1])
    return values


def _gib(size: str) -> float:
    match = re.fullmatch(r"(\d+)([kmg]?)", size.lower())
    assert match, size
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2)] / 1024**3


def _check_docker_run(tokens: list[str], findings: Findings) -> None:
    where = " ".join(tokens)
    for published in _option_values(tokens, "-p", "--publish"):
        if not published.startswith("127.0.0.1:"):
            findings.problems.append(f"{where}: -p {published} publishes on every interface")
    argv = zumik_argv(tokens)
    if (argv is not None or "python3" in tokens) and IMAGE not in tokens:
        findings.problems.append(f"{where}: not the image the manifests run ({IMAGE})")
    if argv is not None and argv[0] == "serve":
        volumes = _option_values(tokens, "-v", "--volume")
        if not any(v.endswith(f":{DATA_DIR}") and not v.startswith("/") for v in volumes):
            findings.problems.append(
                f"{where}: {DATA_DIR} (Redis data, secrets, disk tier) is not in a volume"
            )
        names = _parser().parse_args(argv).profile or ["local-cpu"]  # --profile may repeat
        shm = _option_values(tokens, "--shm-size")
        host_gib = sum(resolve_profile(name).kv_tiers.host_capacity_bytes for name in names) / 1024**3
        if not shm or _gib(shm[0]) < host_gib + 2:  # the host tier and some room for Ray's object store
            findings.problems.append(
                f"{where}: --shm-size must hold the {host_gib:.0f} GiB host tier and more"
            )


def _check_python(tokens: list[str], findings: Findings) -> None:
    program = tokens[tokens.index("-c") + 1]
    try:
        compile(program, "<docs/byoc.md>", "exec")
    except SyntaxError as exc:
        findings.problems.append(f"python3 -c: {exc}")
        return
    sources = {load_builtin(name).model.source for name in builtin_names()}
    for folder in re.findall(r"local_dir='([^']+)'", program):
        if folder not in sources:
            findings.problems.append(f"python3 -c: {folder} is no profile's model.source")


def _check_kuberay_version(version: str, findings: Findings) -> None:
    folder = kuberay_crd_dir()
    if folder is None:
        return  # a user's clone: the CRDs the manifests are checked against are not here
    match = re.search(r"\bv(\d+\.\d+\.\d+)\b", (folder / "README.md").read_text())
    if not match or match.group(1) != version:
        findings.problems.append(
            f"helm --version {version}: the manifests are checked against KubeRay {match}"
        )


def _rayservice_names() -> set[str]:
    names = set()
    for path in (REPO / "deploy" / "kuberay").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayService":
                names.add(doc["metadata"]["name"])
    return names


def _check_kuberay_names(tokens: list[str], findings: Findings) -> None:
    if not tokens or tokens[0] != "kubectl":
        return
    names = _rayservice_names()
    if "rayservice" in tokens:
        name = tokens[tokens.index("rayservice") + 1]
        if name not in names:
            findings.problems.append(f"{' '.join(tokens)}: no RayService {name} in deploy/kuberay")
    for service in re.findall(r"svc/([\w-]+?)-(?:head|serve)-svc\b", " ".join(tokens)):
        if service not in names:
            findings.problems.append(f"{' '.join(tokens)}: KubeRay names no service after {service}")


def test_every_command_of_the_guide_is_one_zumik_and_the_repository_have() -> None:
    findings = check_guide(GUIDE.read_text())
    assert findings.problems == []
    # What the guide must cover, so that the checks above did run on something.
    assert {argv[0] for argv in findings.zumik} >= {"serve", "tenant", "secrets"}
    assert len(findings.zumik) >= 4 and len(findings.docker_runs) >= 2
    for path in ("Dockerfile.cuda", "deploy/kuberay/rayservice.yaml", "deploy/ray-cluster/cluster.yaml",
                 "deploy/redis/kv-redis.yaml"):  # fmt: skip
        assert path in findings.paths


def test_the_guide_names_every_gpu_profile_and_the_tp2_manifest() -> None:
    text = GUIDE.read_text()
    gpu = [name for name in builtin_names() if load_builtin(name).engine.device.value == "cuda"]
    assert len(gpu) >= 3
    for name in [*gpu, "rayservice-tp2.yaml"]:
        assert f"`{name}`" in text, name


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("```bash\nzumik serve --profle qwen-small-gpu\n```\n", "refuses it"),
        ("```bash\nzumik serve --profile no-such-profile\n```\n", "unknown built-in profile"),
        (
            "```bash\nkubectl apply -f deploy/kuberay/missing.yaml\n```\n",
            "no file deploy/kuberay/missing.yaml",
        ),
        (
            f"```bash\ndocker run --gpus all -p 8000:8000 -v zumik-data:{DATA_DIR} --shm-size=8g {IMAGE} "
            "zumik serve --profile qwen-small-gpu --host 0.0.0.0\n```\n",
            "publishes on every interface",
        ),
        (
            f"```bash\ndocker run -p 127.0.0.1:8000:8000 --shm-size=8g {IMAGE} "
            "zumik serve --profile qwen-small-gpu\n```\n",
            "is not in a volume",
        ),
        (
            f"```bash\ndocker run -v d:{DATA_DIR} --shm-size=1g {IMAGE} "
            "zumik serve --profile qwen-small-gpu\n```\n",
            "must hold the 4 GiB host tier",
        ),
        (
            "```bash\ndocker exec z zumik tenant create t && docker run other/image zumik tenant list\n```\n",
            "not the image the manifests run",
        ),
        ("   ```bash\n   ray exec c.yaml 'zumik tenant create'\n   ```\n", "refuses it"),
        (
            "```bash\nkubectl exec svc/other-head-svc -- zumik tenant create t\n```\n",
            "no service after other",
        ),
        (
            "```bash\npython3 -c \"import x; x.f(local_dir='/models/Other')\"\n```\n",
            "no profile's model.source",
        ),
    ],
)
def test_the_checks_refuse_what_would_not_work(snippet: str, problem: str) -> None:
    problems = check_guide(snippet).problems
    assert problems and problem in problems[0], problems
