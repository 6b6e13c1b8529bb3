"""JupyterLab, the course's main interface: start it headless from this environment on a free loopback port,
and check through its REST API that it serves the Lab page, that every notebook under notebooks/ opens as a
valid notebook with the python3 kernelspec, and that a python3 kernel starts. The server is shut down
whatever happens."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STARTUP_S = 90


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, resp.headers.get("Content-Type", ""), raw

    def json(self, method: str, path: str, body: dict | None = None):
        status, _, raw = self.request(method, path, body)
        return status, (json.loads(raw) if raw else None)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A ``jupyter lab`` of this Python environment, rooted at the checkout, with a random token."""
    home = tmp_path_factory.mktemp("jupyter")
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTER_NO_CONFIG": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={ROOT}", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]  # nothing reaches out
    log = (home / "server.log").open("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Server(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"jupyter lab exited with code {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if server.json("GET", "/api/status")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"jupyter lab did not answer on port {port} within {STARTUP_S} s:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        try:
            server.request("POST", "/api/shutdown", timeout=5)
        except Exception:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def test_server_is_up_and_serves_lab(lab):
    status, info = lab.json("GET", "/api/status")
    assert status == 200 and "started" in info
    status, content_type, page = lab.request("GET", "/lab")
    assert status == 200 and "text/html" in content_type and b"JupyterLab" in page


def test_token_is_required(lab):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{lab.url}/api/contents/notebooks", timeout=10)
    assert err.value.code == 403


def test_python3_kernelspec(lab):
    status, specs = lab.json("GET", "/api/kernelspecs")
    assert status == 200 and "python3" in specs["kernelspecs"], specs


def test_every_notebook_opens(lab):
    assert NOTEBOOKS, "no notebooks found"
    status, listing = lab.json("GET", "/api/contents/notebooks")
    assert status == 200
    listed = {item["name"] for item in listing["content"] if item["type"] == "notebook"}
    assert listed == {p.name for p in NOTEBOOKS}
    for path in NOTEBOOKS:
        status, model = lab.json("GET", f"/api/contents/notebooks/{path.name}?content=1")
        assert status == 200 and model["type"] == "notebook" and model["format"] == "json", path.name
        nb = nbformat.from_dict(model["content"])
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3", path.name
        assert any(cell.cell_type == "code" for cell in nb.cells), path.name


def _execute(lab, kernel_id: str, code: str, timeout: float = 90) -> dict:
    """Run ``code`` in a kernel over the server's websocket (the channel JupyterLab itself uses): the
    ``execute_reply`` content and the text printed."""
    import asyncio

    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    async def run():
        url = lab.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
        ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {lab.token}"}))
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "date": "",
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        printed, reply = [], None
        try:
            while reply is None:
                msg = json.loads(await ws.read_message())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    printed.append(msg["content"]["text"])
                elif msg["msg_type"] == "execute_reply":
                    reply = msg["content"]
        finally:
            ws.close()
        return {**reply, "printed": "".join(printed)}

    return asyncio.run(asyncio.wait_for(run(), timeout))


def test_a_python3_kernel_runs_the_course(lab):
    status, kernel = lab.json("POST", "/api/kernels", {"name": "python3"})
    assert status == 201, kernel
    try:
        reply = _execute(lab, kernel["id"], "import sys, apt_course; print(sys.executable); "
                                            "print(apt_course.__name__)")
        assert reply["status"] == "ok", reply
        kernel_python, name = reply["printed"].split()
        assert name == "apt_course"
        # the kernel runs in this environment (python and python3 may be links to one interpreter)
        assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable)
    finally:
        lab.request("DELETE", f"/api/kernels/{kernel['id']}")
