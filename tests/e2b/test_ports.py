"""`get_host(port)`: HTTP and WebSocket traffic to a server inside the sandbox, through the
Vivarium server by host name, without guest networking."""

import base64
import hashlib
import os
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

# A WebSocket echo server on the Python standard library, run inside the sandbox.
ECHO_SERVER = r'''
import base64, hashlib, socketserver, struct

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        headers = {}
        self.rfile.readline()
        while True:
            line = self.rfile.readline().decode().strip()
            if not line:
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(
            (headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Accept: " + accept + "\r\n\r\n").encode())
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            mask = self.rfile.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            reply = b"echo:" + data
            self.wfile.write(bytes([0x81, len(reply)]) + reply)

socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", 8765), Echo).serve_forever()
'''


def _server():
    return urlparse(os.environ["E2B_API_URL"])


def _wait_for_port(sandbox, port):
    for _ in range(100):
        probe = sandbox.commands.run(f"curl -s -o /dev/null -w %{{http_code}} localhost:{port}/ || true").stdout
        if probe not in ("", "000"):
            return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port} in the sandbox")


def test_http_to_a_server_in_the_sandbox(sandbox):
    sandbox.files.write("/home/user/site/index.html", "served from the sandbox")
    sandbox.commands.run("python3 -m http.server 8000 --directory /home/user/site", background=True)
    _wait_for_port(sandbox, 8000)
    host = sandbox.get_host(8000)
    assert host == f"8000-{sandbox.sandbox_id}.localhost"
    request = urllib.request.Request(f"{os.environ['E2B_API_URL']}/index.html", headers={"Host": host})
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
        assert response.read() == b"served from the sandbox"
    closed = urllib.request.Request(os.environ["E2B_API_URL"], headers={"Host": sandbox.get_host(9999)})
    try:
        urllib.request.urlopen(closed)
        raise AssertionError("a closed port answered")
    except urllib.error.HTTPError as err:
        assert err.code == 502
        assert b"9999" in err.read()


def test_websocket_to_a_server_in_the_sandbox(sandbox):
    sandbox.files.write("/home/user/echo.py", ECHO_SERVER)
    sandbox.commands.run("python3 /home/user/echo.py", background=True)
    for _ in range(100):
        if sandbox.commands.run("python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8765))' && echo up || true").stdout == "up\n":
            break
        time.sleep(0.2)
    server = _server()
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((server.hostname, server.port), timeout=30) as conn:
        conn.sendall(
            (
                "GET /chat HTTP/1.1\r\n"
                f"Host: {sandbox.get_host(8765)}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += conn.recv(4096)
        head, _, rest = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        expected = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        assert expected in head
        for text in [b"hello", b"second message"]:
            mask = os.urandom(4)
            conn.sendall(bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text)))
            frame = rest
            while len(frame) < 2 or len(frame) < 2 + frame[1]:
                frame += conn.recv(4096)
            length = frame[1]
            assert frame[2 : 2 + length] == b"echo:" + text
            rest = frame[2 + length :]
