"""Helpers for the deployment tests: render the repository's nginx template and run Debian's nginx.

``docker/nginx/nginx.conf.template`` is the balancer config that docker/compose.yaml uses; here it is
rendered for a local nginx in front of local server ports (``render_nginx_conf``), checked with
``nginx -t`` (``nginx_config_test``) or run in the foreground (``running_nginx``), everything under one
temporary prefix (config, pid, logs, temp files), so no root and no system paths are needed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
NGINX_TEMPLATE = REPO / "docker" / "nginx" / "nginx.conf.template"
K8S_DIR = REPO / "docker" / "k8s"

_PLACEHOLDER = re.compile(r"\$\{(NGINX_[A-Z0-9_]+)\}")


def render_template(text: str, values: Mapping[str, str]) -> str:
    """Fill the ``${NGINX_*}`` placeholders as the nginx image's envsubst step does.

    Unlike envsubst, a placeholder without a value is an error rather than left in place.
    """
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(values))
    if missing:
        raise KeyError(f"no value for nginx template placeholders {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def upstream_servers(upstreams: Sequence[str], *, max_fails: int = 1, fail_timeout: str = "10s") -> str:
    """The upstream block body for static ``host:port`` addresses."""
    if not upstreams:
        raise ValueError("at least one upstream address is needed")
    return "\n        ".join(f"server {a} max_fails={max_fails} fail_timeout={fail_timeout};" for a in upstreams)


def render_nginx_conf(
    upstreams: Sequence[str],
    listen_port: int,
    prefix: Path,
    *,
    max_fails: int = 1,
    fail_timeout: str = "10s",
    upstream_block: str | None = None,
    listen_host: str | None = None,
) -> Path:
    """Render the balancer config for ``upstreams`` (``"127.0.0.1:8001"``, ...) into ``prefix``.

    Creates ``prefix/nginx.conf``, ``prefix/temp`` and ``prefix/logs`` (access.log; error.log once
    run through :func:`nginx_command`) and returns the config path. ``upstream_block`` replaces the
    generated ``server`` lines verbatim (e.g. the compose file's resolver + resolve variant).
    ``listen_host`` (e.g. ``"127.0.0.1"``) binds only that address; by default nginx listens on every
    interface, as the template does in a container.
    """
    prefix = Path(prefix).resolve()
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    values = {
        "NGINX_LISTEN_PORT": str(int(listen_port)) if listen_host is None else f"{listen_host}:{int(listen_port)}",
        "NGINX_TEMP_DIR": str(prefix / "temp"),
        "NGINX_ACCESS_LOG": str(prefix / "logs" / "access.log"),
        "NGINX_UPSTREAM_SERVERS": upstream_block
        if upstream_block is not None
        else upstream_servers(upstreams, max_fails=max_fails, fail_timeout=fail_timeout),
    }
    conf = prefix / "nginx.conf"
    conf.write_text(render_template(NGINX_TEMPLATE.read_text(), values))
    return conf


def nginx_binary() -> str:
    """Path of the nginx binary (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    candidates = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
    found = shutil.which("nginx") or next((p for p in candidates if os.access(p, os.X_OK)), None)
    if found is None:
        raise FileNotFoundError("nginx not found: install Debian's nginx (apt-get install -y nginx-light)")
    return found


def nginx_version() -> tuple[int, ...]:
    out = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, check=True)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    if m is None:
        raise RuntimeError(f"cannot parse nginx version from {out.stderr!r}")
    return tuple(int(x) for x in m.groups())


def nginx_command(conf: Path, *extra: str) -> list[str]:
    """``nginx`` in the foreground with the pid file and error log in the config's folder.

    As root, workers run as root too: by default they would switch to nobody, who cannot enter
    pytest's private temp folders.
    """
    prefix = Path(conf).resolve().parent
    directives = f"daemon off; pid {prefix / 'nginx.pid'};"
    if os.geteuid() == 0:
        directives += " user root;"
    return [
        nginx_binary(),
        "-p", f"{prefix}/",
        "-c", str(Path(conf).resolve()),
        "-e", str(prefix / "logs" / "error.log"),
        "-g", directives,
        *extra,
    ]  # fmt: skip


def nginx_config_test(conf: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on ``conf``; the caller asserts on ``returncode`` and shows ``stderr``."""
    return subprocess.run(nginx_command(conf, "-t"), capture_output=True, text=True, timeout=60)


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


@contextlib.contextmanager
def running_nginx(
    upstreams: Sequence[str], listen_port: int, prefix: Path, **render_kwargs
) -> Iterator[subprocess.Popen]:
    """Render the config, start nginx in the foreground, wait for its port; stop it on exit.

    On a failed start the error log is in the raised message; after the run it is at
    ``prefix/logs/error.log`` (access log: ``prefix/logs/access.log``).
    """
    conf = render_nginx_conf(upstreams, listen_port, prefix, **render_kwargs)
    check = nginx_config_test(conf)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
    error_log = Path(prefix).resolve() / "logs" / "error.log"
    proc = subprocess.Popen(nginx_command(conf), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(listen_port)
        except TimeoutError:
            log = error_log.read_text() if error_log.exists() else ""
            raise RuntimeError(f"nginx did not start (exit code {proc.poll()}):\n{log}") from None
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # fast shutdown: drops open connections
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
