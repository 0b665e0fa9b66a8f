"""`header --format nginx|caddy|apache` and examples/nginx.conf, checked by the real servers.

Each snippet goes through the server's own config check, then the server is started on a free
127.0.0.1 port and the headers it sends must equal the intended values byte for byte: that is
what proves the escaping (a ``$host`` or ``%D`` in the URL would otherwise be expanded).
Skipped, with the reason, when the server binary is not installed (Debian: nginx-core, caddy,
apache2-bin).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

from reporting_endpoint.cli import main
from reporting_endpoint.headers import HeaderOptions, build_headers
from reporting_endpoint.settings import Settings
from tests.servers import free_port, make_certificate

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
CADDY = shutil.which("caddy")
APACHE = shutil.which("apache2") or (
    "/usr/sbin/apache2" if Path("/usr/sbin/apache2").exists() else None
)
APACHE_MODULES = Path("/usr/lib/apache2/modules")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "nginx.conf"

# Everything each server could misread: quotes, ; and # (config syntax), % sequences that
# mod_headers expands (%D is the request time, %t the time, %% a percent), & and = and ,.
TRICKY_URL = "https://r.example:8443/re%20ports/it's;v=1,2?a=%D&b=%t&c=50%25&d=%%#top"
# What nginx would expand: only with the "$" percent-encoded can nginx serve it.
DOLLAR_URL = "https://r.example/reports?via=$host"


def needs(binary: str | None, name: str) -> None:
    if binary is None:
        pytest.skip(f"{name} is not installed (Debian package: see the module docstring)")


def snippet(url: str, fmt: str) -> str:
    out = io.StringIO()
    code = main(["header", "--url", url, "--nel", "--js-stacks", "--format", fmt], out=out)
    assert code == 0
    return out.getvalue()


def intended(url: str) -> dict[str, str]:
    return build_headers(HeaderOptions(url=url, nel=True, js_stacks=True))


def check(command: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, f"{command[0]} refused the config:\n{result.stderr}"


@contextmanager
def running(command: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[None]:
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if process.poll() is not None:
                err = process.stderr.read().decode() if process.stderr else ""
                pytest.fail(f"{command[0]} exited with {process.returncode}:\n{err}")
            try:
                httpx2.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx2.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"{command[0]} is not listening on {port}")
        yield
    finally:
        # The whole group: nginx and apache fork workers.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stderr:
            process.stderr.close()


def served(port: int, path: str = "/") -> dict[str, str]:
    answer = httpx2.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    assert answer.status_code < 500
    names = ("Reporting-Endpoints", "Report-To", "NEL", "Document-Policy")
    return {name: answer.headers[name] for name in names if name in answer.headers}


def nginx_config(folder: Path, port: int, server_block: str) -> Path:
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / name).mkdir(exist_ok=True)
    temp_paths = "".join(
        f"    {name}_temp_path {folder / ('body' if name == 'client_body' else name)};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = folder / "nginx.conf"
    config.write_text(
        f"daemon off;\nmaster_process off;\npid {folder / 'nginx.pid'};\n"
        f"error_log stderr;\nevents {{}}\nhttp {{\n    access_log off;\n{temp_paths}"
        f"{server_block}\n}}\n"
    )
    return config


def nginx_command(folder: Path, config: Path, test: bool) -> list[str]:
    assert NGINX is not None
    return [NGINX, *(["-t"] if test else []), "-e", "stderr", "-p", str(folder), "-c", str(config)]


@pytest.mark.parametrize("url", [TRICKY_URL, DOLLAR_URL.replace("$", "%24")])
def test_nginx_serves_exactly_the_header_values(tmp_path: Path, url: str) -> None:
    needs(NGINX, "nginx")
    port = free_port()
    block = (
        f"server {{\n listen 127.0.0.1:{port};\n location / {{\n"
        f"{snippet(url, 'nginx')}\n return 200 'ok';\n }}\n}}"
    )
    config = nginx_config(tmp_path, port, block)
    check(nginx_command(tmp_path, config, test=True))
    with running(nginx_command(tmp_path, config, test=False), port):
        assert served(port) == intended(url)


def test_nginx_format_refuses_a_dollar(capsys: pytest.CaptureFixture[str]) -> None:
    """nginx has no escape for "$": it would send the client's own Host header instead."""
    out = io.StringIO()
    assert main(["header", "--url", DOLLAR_URL, "--format", "nginx"], out=out) == 2
    assert out.getvalue() == ""
    assert "%24" in capsys.readouterr().err
    # The other formats take it as it is.
    assert main(["header", "--url", DOLLAR_URL, "--format", "caddy"], out=out) == 0


@pytest.mark.parametrize("url", [TRICKY_URL, DOLLAR_URL])
def test_caddy_serves_exactly_the_header_values(tmp_path: Path, url: str) -> None:
    needs(CADDY, "caddy")
    assert CADDY is not None
    port = free_port()
    config = tmp_path / "Caddyfile"
    config.write_text(
        "{\n\tadmin off\n\tauto_https off\n}\n"
        f'http://127.0.0.1:{port} {{\n{snippet(url, "caddy")}\trespond "ok" 200\n}}\n'
    )
    # Caddy keeps state under $HOME/.config and .local: keep it in the test's folder.
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    check([CADDY, "validate", "--config", str(config), "--adapter", "caddyfile"], env)
    with running([CADDY, "run", "--config", str(config), "--adapter", "caddyfile"], port, env):
        assert served(port) == intended(url)


@pytest.mark.parametrize("url", [TRICKY_URL, DOLLAR_URL])
def test_apache_serves_exactly_the_header_values(tmp_path: Path, url: str) -> None:
    needs(APACHE, "apache2")
    if not (APACHE_MODULES / "mod_headers.so").exists():
        pytest.skip(f"no mod_headers.so in {APACHE_MODULES}")
    assert APACHE is not None
    port = free_port()
    (tmp_path / "run").mkdir()
    config = tmp_path / "httpd.conf"
    config.write_text(
        f'ServerRoot "{tmp_path}"\nServerName 127.0.0.1\nListen 127.0.0.1:{port}\n'
        f"LoadModule mpm_event_module {APACHE_MODULES / 'mod_mpm_event.so'}\n"
        f"LoadModule headers_module {APACHE_MODULES / 'mod_headers.so'}\n"
        f"DefaultRuntimeDir {tmp_path / 'run'}\nPidFile {tmp_path / 'run' / 'httpd.pid'}\n"
        f"ErrorLog {tmp_path / 'error.log'}\nDocumentRoot {tmp_path}\n"
        "User nobody\nGroup nogroup\n"
        f"{snippet(url, 'apache')}"
    )
    check([APACHE, "-t", "-f", str(config)])
    with running([APACHE, "-f", str(config), "-DFOREGROUND"], port):
        assert served(port) == intended(url)


def test_urls_past_the_length_cap_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    long_url = "https://r.example/" + "a" * 2100
    assert main(["header", "--url", long_url], out=io.StringIO()) == 2
    assert "at most 2048" in capsys.readouterr().err
    assert main(["header", "--url", long_url[:2048]], out=io.StringIO()) == 0


# examples/nginx.conf (item 17)


def test_example_nginx_conf_lets_every_accepted_dump_through() -> None:
    text = EXAMPLE.read_text()
    sizes = re.findall(r"^\s*client_max_body_size\s+(\d+)([kKmMgG]?);", text, re.M)
    assert sizes, "the example sets no client_max_body_size (nginx's default is 1 MiB)"
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    for number, unit in sizes:
        assert int(number) * scale[unit.lower()] >= Settings().crashpad_max_body_bytes
    # Without HTTP/1.1 to the upstream nginx buffers chunked uploads despite the next line.
    assert re.search(r"^\s*proxy_request_buffering\s+off;", text, re.M)
    assert re.search(r"^\s*proxy_http_version\s+1\.1;", text, re.M)


def test_example_nginx_conf_headers_are_what_the_command_prints() -> None:
    text = EXAMPLE.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("add_header")]
    # The example uses the command's default options (no NEL or JS stacks).
    out = io.StringIO()
    url = "https://www.example.com/reporting/reports"
    assert main(["header", "--url", url, "--format", "nginx"], out) == 0
    assert lines == out.getvalue().splitlines()


def test_example_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    needs(NGINX, "nginx")
    certificate = make_certificate(tmp_path / "tls")
    port = free_port()
    text = EXAMPLE.read_text()
    # Only what a deployment changes: its port and its certificate; the rest is checked as is.
    text = re.sub(r"listen\s+443\s+ssl;", f"listen 127.0.0.1:{port} ssl;", text)
    text = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {certificate.cert_file};", text)
    text = re.sub(
        r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {certificate.key_file};", text
    )
    assert str(certificate.cert_file) in text, "the example no longer names its certificate"
    config = nginx_config(tmp_path, port, text)
    check(nginx_command(tmp_path, config, test=True))
