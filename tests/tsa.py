"""A real RFC 3161 timestamp authority on a loopback port: OpenSSL's responder (`openssl ts -reply`) behind the
HTTP transport of RFC 3161 section 3.4 (POST application/timestamp-query, answered application/timestamp-reply)."""

from __future__ import annotations

import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.pki import Authority

CONFIG = """\
[ tsa ]
default_tsa = tsa_config

[ tsa_config ]
dir = {folder}
serial = $dir/tsaserial
crypto_device = builtin
signer_cert = {cert}
certs = {ca}
signer_key = {key}
signer_digest = sha256
default_policy = 1.3.6.1.4.1.99999.3161.1
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = no
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


@contextmanager
def openssl_tsa(authority: Authority, folder: Path) -> Iterator[str]:
    """The URL of a timestamp authority whose certificate `authority` issued, for as long as the block runs."""
    issued = authority.issue_timestamping("timestamps")
    config = folder / "tsa.cnf"
    config.write_text(CONFIG.format(folder=folder, cert=issued.cert, key=issued.key, ca=authority.cert))
    (folder / "tsaserial").write_text("01\n")
    lock = threading.Lock()  # the serial file is read and written by each reply

    class Responder(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            query = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock, tempfile.TemporaryDirectory(dir=folder) as work:
                (Path(work) / "query.tsq").write_bytes(query)
                made = subprocess.run(
                    [
                        "openssl",
                        "ts",
                        "-reply",
                        "-config",
                        str(config),
                        "-queryfile",
                        "query.tsq",
                        "-out",
                        "reply.tsr",
                    ],
                    cwd=work,
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
                reply = (Path(work) / "reply.tsr").read_bytes() if made.returncode == 0 else b""
            if not reply:
                self.send_error(500, made.stderr.decode(errors="replace")[:200])
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class names it so
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Responder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
