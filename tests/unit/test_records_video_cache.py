"""The cache of clips remuxed to MP4 stays within RECORDS_RENDER_VIDEO_CACHE_BYTES and _SECONDS: least recently
used first, the file just made kept, partial files of a crashed remux removed after an hour."""

from __future__ import annotations

import os
import time
from pathlib import Path

from services.records.rendering import RenderLimits
from services.records.video import MP4, cache_path, cached, prune


def entry(where: Path, name: str, size: int, age: float) -> Path:
    path = where / name
    path.write_bytes(b"\0" * size)
    moment = time.time() - age
    os.utime(path, (moment, moment))
    return path


def test_the_least_recently_used_clips_go_first_and_the_new_one_stays(tmp_path: Path) -> None:
    old, used, new = (
        entry(tmp_path, f"{n}.mp4", 400, a) for n, a in (("old", 300), ("used", 200), ("new", 0))
    )
    prune(tmp_path, RenderLimits(video_cache_bytes=1000), keep=new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.mp4", "used.mp4"]
    prune(tmp_path, RenderLimits(video_cache_bytes=100), keep=new)  # over budget alone: still kept
    assert [p.name for p in tmp_path.iterdir()] == ["new.mp4"]
    assert not old.exists() and not used.exists()


def test_stale_clips_and_abandoned_partial_files_are_removed(tmp_path: Path) -> None:
    stale = entry(tmp_path, "stale.mp4", 10, 7200)
    fresh = entry(tmp_path, "fresh.mp4", 10, 10)
    abandoned = entry(tmp_path, "x.part", 10, 7200)
    writing = entry(tmp_path, "y.part", 10, 5)
    prune(tmp_path, RenderLimits(video_cache_seconds=3600), keep=fresh)
    assert not stale.exists() and not abandoned.exists()
    assert fresh.exists() and writing.exists()


def test_webms_share_the_cache_budget_with_mp4s(tmp_path: Path) -> None:
    """A WebM (encoded, webm.py) counts against the same bytes and is removed least recently used first."""
    old = entry(tmp_path, "a-1.webm", 400, 300)
    used = entry(tmp_path, "b-1.mp4", 400, 200)
    new = entry(tmp_path, "c-1.webm", 400, 0)
    prune(tmp_path, RenderLimits(video_cache_bytes=1000), keep=new)
    assert not old.exists() and used.exists() and new.exists()


def test_a_use_marks_the_clip_used_without_changing_when_it_was_made(tmp_path: Path) -> None:
    """Its modification time is what the answer's ETag and Last-Modified come from: a use that changed it
    would turn every `If-Range` into a whole-clip answer. The use is the access time, which pruning reads."""
    limits = RenderLimits(video_cache_dir=str(tmp_path), video_cache_bytes=1000)
    made_long_ago = entry(tmp_path, cache_path("a" * 64, MP4, limits).name, 400, 300)
    newer = entry(tmp_path, "b-1.mp4", 400, 200)
    made = made_long_ago.stat().st_mtime_ns
    assert cached("a" * 64, MP4, limits) == made_long_ago
    assert made_long_ago.stat().st_mtime_ns == made
    assert made_long_ago.stat().st_atime > time.time() - 60
    new = entry(tmp_path, "c-1.mp4", 400, 0)
    prune(tmp_path, limits, keep=new)  # the one used just now stays; the one unused for 200 s goes
    assert made_long_ago.exists() and not newer.exists()
