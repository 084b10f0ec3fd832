"""Checks of the systemd deployment files in systemd/.

systemd is not PID 1 on CI machines, so everything here is offline: `systemd-analyze security
--offline=true` for the sandbox, `systemd-analyze verify` against a throw-away root for syntax and
references, and a small parser for the directives the process model depends on. Unit files allow
repeated keys (and an empty assignment resets a list), so configparser is of no use here.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEMD_DIR = REPO / "systemd"
SERVICE = SYSTEMD_DIR / "llm-edge-proxy.service"
SOCKET = SYSTEMD_DIR / "llm-edge-proxy.socket"
ENV_EXAMPLE = SYSTEMD_DIR / "env.example"
INSTALL_PREFIX = "/opt/llm-edge-proxy/"

# gunicorn.conf.py's graceful_timeout: systemd must wait longer than this before SIGKILL.
GRACEFUL_TIMEOUT_S = 30
MAX_EXPOSURE = 2.0
# The only checks of `systemd-analyze security` allowed to count against the unit, and why.
ACCEPTED_EXPOSURES = {
    "PrivateNetwork=": "a network proxy needs the host's network",
    "IPAddressDeny=": "clients and the upstream may be anywhere",
    "RestrictAddressFamilies=~AF_(INET|INET6)": "it serves and calls over TCP",
    "RestrictAddressFamilies=~AF_UNIX": "NOTIFY_SOCKET, the journal, unix listeners",
    "RootDirectory=/RootImage=": "runs from a virtualenv on the host's root",
    "DeviceAllow=": "ProtectClock= adds a read-only char-rtc rule by itself",
}


# ---- helpers ---------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Section name -> ordered (key, value) pairs, keeping repeats, as systemd reads them."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=value line: {raw!r}"
        assert current is not None, f"assignment outside any section: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    """Effective values of a list-type key: an empty assignment clears what came before."""
    result: list[str] = []
    for k, v in section:
        if k == key:
            result = [] if v == "" else [*result, v]
    return result


def last(section: list[tuple[str, str]], key: str) -> str | None:
    found = [v for k, v in section if k == key]
    return found[-1] if found else None


_TIMESPAN_UNITS = {
    "ms": 0.001, "msec": 0.001, "": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600,
    "hours": 3600,
}  # fmt: skip


def timespan_seconds(text: str) -> float:
    """systemd.time(7) spans such as `45s`, `1min 30s` or `90`; `infinity` is refused."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), text
    return sum(float(n) * _TIMESPAN_UNITS[u] for n, u in parts)


def exec_paths(section: list[tuple[str, str]]) -> Iterator[str]:
    """The executables named by Exec*= lines (prefixes such as `-`, `+`, `!` removed)."""
    for key, value in section:
        if key.startswith("Exec") and value:
            yield value.split()[0].lstrip("-@:+!|")


def parse_env_file(text: str) -> dict[str, str]:
    """The subset of EnvironmentFile= syntax env.example uses: KEY=value, comments, quotes."""
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"bad line {raw!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


@pytest.fixture(scope="module")
def service() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(SERVICE.read_text())


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return path


def _unit_dir_of_host() -> Path:
    for candidate in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(candidate, "sysinit.target").exists():
            return Path(candidate)
    pytest.fail("systemd-analyze is installed but no system unit directory was found")


def verify_in_fake_root(analyze: str, root: Path, units: Mapping[str, str]) -> tuple[int, str]:
    """Run `systemd-analyze verify` on `units` (name -> text), unchanged, inside a fake root.

    Offline verification checks that every Exec*= binary exists, and the venv's gunicorn does not
    exist on a build machine. Rather than rewriting ExecStart= (which would verify a different
    file), the unit text is verified byte for byte under `--root`: the root holds a copy of the
    host's system unit directory (for sysinit.target, network-online.target, ...), the units in
    /etc/systemd/system, and an executable stub at every Exec*= path. Only paths under the
    install prefix may be missing on the host; any other binary (/bin/kill) must really exist.
    `--man=no`: no man pages needed; `--generators=no`: generators need privileges.
    """
    shutil.copytree(_unit_dir_of_host(), root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name, text in units.items():
        (unit_dir / name).write_text(text)
        for path in exec_paths(parse_unit(text).get("Service", [])):
            assert path.startswith(INSTALL_PREFIX) or shutil.which(path), (
                f"{name}: {path} is not executable on this host"
            )
            stub = root / path.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    proc = subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", "--generators=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _lines_about(output: str, names: Mapping[str, str]) -> list[str]:
    return [line for line in output.splitlines() if any(name in line for name in names)]


# ---- systemd-analyze ---------------------------------------------------------------------------


def test_security_exposure_is_at_most_2(systemd_analyze: str) -> None:
    proc = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--no-pager",
         f"--threshold={int(MAX_EXPOSURE * 10)}", str(SERVICE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(
        r"Overall exposure level for llm-edge-proxy\.service: (\d+(?:\.\d+)?)", proc.stdout
    )
    assert match, f"no overall exposure in the output:\n{proc.stdout}\n{proc.stderr}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, proc.stdout
    # --threshold makes systemd-analyze itself exit non-zero above the limit (10 = 1.0).
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_security_only_accepted_checks_count_against_the_unit(systemd_analyze: str) -> None:
    # The total could stay under 2.0 while one directive quietly disappears; this catches that.
    proc = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--no-pager", "--json=short",
         str(SERVICE)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    checks = json.loads(proc.stdout)
    assert len(checks) > 50, "systemd-analyze reported suspiciously few checks"
    exposed = {c["name"]: c["description"] for c in checks if c["exposure"] not in (None, "0.0")}
    unexpected = {name: why for name, why in exposed.items() if name not in ACCEPTED_EXPOSURES}
    assert not unexpected, f"checks counting against the unit: {unexpected}"


def test_verify_is_clean(systemd_analyze: str, tmp_path: Path) -> None:
    units = {SERVICE.name: SERVICE.read_text(), SOCKET.name: SOCKET.read_text()}
    returncode, output = verify_in_fake_root(systemd_analyze, tmp_path, units)
    # verify exits 0 even for unknown keys or unparsable values; those only show as lines
    # naming the unit, so the output is checked as well as the exit status.
    assert returncode == 0, output
    assert not _lines_about(output, units), output


def test_verify_harness_reports_a_broken_unit(systemd_analyze: str, tmp_path: Path) -> None:
    # Guards the test above against a harness that cannot see problems at all.
    broken = SERVICE.read_text().replace("Type=notify", "Type=notifyy\nKillModee=mixed")
    units = {SERVICE.name: broken}
    _, output = verify_in_fake_root(systemd_analyze, tmp_path, units)
    problems = _lines_about(output, units)
    assert any("notifyy" in line for line in problems), output
    assert any("KillModee" in line for line in problems), output


# ---- directives the process model depends on ---------------------------------------------------


def test_service_runs_gunicorn_as_a_notify_service(service) -> None:
    svc = service["Service"]
    assert last(svc, "Type") == "notify"
    # The gunicorn master is the main process and the one that sends READY=1.
    assert last(svc, "NotifyAccess") in ("main", "all")
    assert last(svc, "ExecStart") == (
        "/opt/llm-edge-proxy/venv/bin/gunicorn -c /opt/llm-edge-proxy/gunicorn.conf.py"
    )
    assert last(svc, "WorkingDirectory") == "/opt/llm-edge-proxy"
    # Not optional ("-" prefix): a missing config file must stop the start, not run on defaults.
    assert values(svc, "EnvironmentFile") == ["/etc/llm-edge-proxy/env"]
    assert last(svc, "Restart") == "on-failure"


def test_reload_and_stop_are_gunicorns_graceful_ones(service) -> None:
    svc = service["Service"]
    reload_ = last(svc, "ExecReload") or ""
    assert re.fullmatch(r"/(usr/)?bin/kill (-HUP|-s HUP|--signal HUP) \$MAINPID", reload_), reload_
    # SIGTERM to the master only (graceful shutdown), SIGKILL to the rest only after the timeout.
    assert last(svc, "KillMode") == "mixed"
    assert last(svc, "KillSignal") in (None, "SIGTERM", "TERM")
    assert timespan_seconds(last(svc, "TimeoutStopSec") or "") > GRACEFUL_TIMEOUT_S


def test_runtime_directory_identity_and_secrets(service) -> None:
    svc = service["Service"]
    assert values(svc, "RuntimeDirectory") == ["llm-edge-proxy"]
    assert last(svc, "RuntimeDirectoryMode") == "0700"
    assert last(svc, "UMask") == "0077"
    assert last(svc, "LimitCORE") == "0"
    dynamic = last(svc, "DynamicUser") in ("yes", "true", "1", "on")
    user = last(svc, "User")
    assert dynamic or (user and user not in ("root", "0")), "needs a dedicated non-root user"


def test_no_capabilities_by_default(service) -> None:
    svc = service["Service"]
    # An empty CapabilityBoundingSet= drops everything; AmbientCapabilities grants nothing.
    assert any(k == "CapabilityBoundingSet" for k, _ in svc)
    assert values(svc, "CapabilityBoundingSet") == []
    assert values(svc, "AmbientCapabilities") == []
    assert last(svc, "NoNewPrivileges") == "yes"


def test_sandbox_leaves_shared_memory_and_network_usable(service) -> None:
    svc = service["Service"]
    # posix_ipc keeps the rate-limit table in /dev/shm, which ProtectSystem= leaves alone and
    # PrivateDevices= bind-mounts into its private /dev; nothing may hide it or make it read-only.
    assert last(svc, "ProtectSystem") == "strict"
    assert last(svc, "PrivateDevices") == "yes"
    for key in ("ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindReadOnlyPaths"):
        for value in values(svc, key):
            for path in value.split():
                path = path.lstrip("-+").split(":")[0]
                assert not "/dev/shm".startswith(path.rstrip("/") or "/"), f"{key}={value}"
    # It is a proxy: it must reach clients and the upstream.
    assert last(svc, "PrivateNetwork") in (None, "no")
    assert values(svc, "IPAddressDeny") == []
    families = " ".join(values(svc, "RestrictAddressFamilies")).split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    assert not any(f.startswith("~") for f in families)


def test_socket_unit_is_optional_for_the_service(service) -> None:
    sock = parse_unit(SOCKET.read_text())
    # One listening socket handed to the one gunicorn master, which adopts $LISTEN_FDS.
    assert values(sock["Socket"], "ListenStream")
    assert last(sock["Socket"], "Accept") in (None, "no", "false")
    assert last(sock["Socket"], "Service") in (None, SERVICE.name)
    # The service must still start on its own, binding SERVER_ADDRESS itself.
    for key in ("Requires", "BindsTo", "Requisite"):
        assert not any(SOCKET.name in v.split() for v in values(service.get("Unit", []), key))


# ---- env.example ------------------------------------------------------------------------------


class _RecordingEnv(dict):
    """A mapping that remembers every variable name looked up in it."""

    def __init__(self, data: Mapping[str, str]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def test_env_example_is_accepted_and_documents_every_variable(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    config_module = importlib.import_module("edge.config")
    text = ENV_EXAMPLE.read_text()
    example = parse_env_file(text)
    env = _RecordingEnv(example)
    config = config_module.Config.from_env(env)  # raises ConfigError on a bad example value

    assert config.bind == example["SERVER_ADDRESS"]
    assert config.auth_enabled, "the example must not run open"
    # Names set in the example, or shown commented out as `#NAME=`.
    documented = set(env) | set(re.findall(r"^#([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    assert documented - env.read == set(), "documented but never read by Config.from_env"
    assert env.read - documented == set(), "read by Config.from_env but not documented"
