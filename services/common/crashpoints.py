"""Crash points: die like `kill -9` inside a dangerous window, to prove the window is safe. Tests only.

Armed by CRASH_POINTS (comma-separated names); each armed point fires once per CRASH_POINTS_DIR (a marker
file records it), so the restarted process runs through. Unset in production: then a call is one dict lookup.
`name@what` arms a point only where it passes `what` (the activity's: the message type it just published).

    consumer.after_commit_before_ack        the effect and inbox row are committed, the message is not acked
    outbox.after_publish_before_mark        the broker has the event, the outbox row is not marked published
    publish.after_send_before_confirmed     the broker has the message, the publisher has not recorded it
    activity.after_publish_before_complete  the command is published, Temporal has not recorded the activity
    bridge.after_signal_before_ack          the workflow has the event, the message is not acked
    insurance.after_payer_call_before_record  the payer answered, the answer is not stored
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

KILLED = 137  # what a shell reports for a process killed by SIGKILL


def crash_point(name: str, what: str | None = None) -> None:
    armed = os.environ.get("CRASH_POINTS")
    if not armed:
        return
    points = armed.split(",")
    if name in points:
        entry = name
    elif what is not None and f"{name}@{what}" in points:
        entry = f"{name}@{what}"
    else:
        return
    marker = Path(os.environ.get("CRASH_POINTS_DIR", ".")) / f"{entry}.fired"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    sys.stdout.write(f'{{"event": "crash_point.fired", "point": "{entry}"}}\n')
    sys.stdout.flush()
    os._exit(KILLED)
