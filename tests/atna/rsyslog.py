"""A real syslog receiver for the ATNA feed: rsyslog (Debian's rsyslog and rsyslog-gnutls) started by the test
with its own configuration, on a loopback port, TLS with client certificates required (RFC 5425) or UDP (imudp,
RFC 5426), writing each message it receives as one line of a file. Never the system's rsyslog service."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.infra import free_port
from tests.pki import Authority

CONFIG = """
global(
  workDirectory="{work}"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
  maxMessageSize="64k"
)
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/name"
       permittedPeer=["{peer}"])
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="whole" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{out}" template="whole" flushOnTXEnd="on" asyncWriting="off")
"""

UDP_CONFIG = """
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imudp")
input(type="imudp" port="{port}" address="127.0.0.1")
template(name="whole" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{out}" template="whole" flushOnTXEnd="on" asyncWriting="off")
"""

# RFC 5424 header of what the feed sends: PRI, version, timestamp, host, app, procid, msgid, no structured data.
HEADER = re.compile(rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) - \xef\xbb\xbf")


@dataclass
class Received:
    pri: int
    app_name: str
    msgid: str
    xml: bytes


def free_udp_port() -> int:
    """A loopback port free for TCP (see tests.infra.free_port) and for UDP."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


class Rsyslog:
    """rsyslogd in the foreground (-n) on `port`; `start`, `stop`, and `received` (every message so far)."""

    def __init__(self, folder: Path, pki: Authority | None, client_name: str = "", udp: bool = False) -> None:
        binary = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        assert Path(binary).exists(), "rsyslogd is needed: apt-get install rsyslog rsyslog-gnutls"
        self.binary = binary
        self.folder = folder
        self.udp = udp
        self.process: subprocess.Popen[bytes] | None = None
        self.port = free_udp_port() if udp else free_port()
        self.out = folder / "received.log"
        work = folder / "work"
        work.mkdir(parents=True, exist_ok=True)
        self.config = folder / "rsyslog.conf"
        if udp:
            self.config.write_text(UDP_CONFIG.format(work=work, port=self.port, out=self.out))
            return
        assert pki is not None
        server = pki.issue("rsyslog", server=True)
        self.config.write_text(
            CONFIG.format(
                work=work,
                ca=pki.cert,
                cert=server.cert,
                key=server.key,
                peer=client_name,
                port=self.port,
                out=self.out,
            )
        )

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-n", "-f", str(self.config), "-i", str(self.folder / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "rsyslogd.err", "ab"),  # noqa: SIM115 -- kept by the child
            env={**os.environ, "RSYSLOG_MODDIR": "/usr/lib/x86_64-linux-gnu/rsyslog/"},
        )
        deadline = time.monotonic() + 10
        while not self.listening():
            assert self.process.poll() is None, (self.folder / "rsyslogd.err").read_text()
            assert time.monotonic() < deadline, "rsyslogd did not listen within 10 s"
            time.sleep(0.05)

    def listening(self) -> bool:
        if self.udp:  # bound: a line of /proc/net/udp for 127.0.0.1:port
            bound = f"0100007F:{self.port:04X}"
            sockets = Path("/proc/net/udp").read_text().splitlines()[1:]
            return any(line.split()[1] == bound for line in sockets)
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process = None

    def received(self) -> list[Received]:
        if not self.out.exists():
            return []
        messages = []
        for line in self.out.read_bytes().splitlines():
            found = HEADER.match(line)
            assert found is not None, line[:200]
            pri, _, _, app, _, msgid = found.groups()
            messages.append(Received(int(pri), app.decode(), msgid.decode(), line[found.end() :]))
        return messages
