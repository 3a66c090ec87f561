"""A reader process for upgrade rehearsals: loops over files through a mount, checking bytes.

Usage: python reader.py SPEC.json RESULT.json STOP_FILE
SPEC: {"files": {path: sha256}, "held": path, "dir": path}. Until STOP_FILE exists it reads
every file whole, preads from one fd held open the whole time, and lists a directory through
a held directory fd; it counts reads, errors and wrong bytes, records the slowest read, and
writes RESULT when it stops.
"""

import hashlib
import json
import os
import sys
import time


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    result_path, stop_file = sys.argv[2], sys.argv[3]
    files: dict[str, str] = spec["files"]
    held = os.open(spec["held"], os.O_RDONLY)
    held_sha = files[spec["held"]]
    held_dir = os.open(spec["dir"], os.O_RDONLY | os.O_DIRECTORY)
    dir_names = sorted(os.listdir(held_dir))
    stats = {"reads": 0, "errors": 0, "wrong": 0, "slowest": 0.0, "messages": []}

    def check(label: str, ok: bool, started: float) -> None:
        stats["reads"] += 1
        stats["slowest"] = max(stats["slowest"], time.monotonic() - started)
        if not ok:
            stats["wrong"] += 1
            stats["messages"].append(f"wrong bytes: {label}")

    while not os.path.exists(stop_file):
        for path, sha in files.items():
            started = time.monotonic()
            try:
                with open(path, "rb") as f:
                    check(path, hashlib.sha256(f.read()).hexdigest() == sha, started)
                started = time.monotonic()
                data = os.pread(held, 1 << 22, 0)
                check("held fd", hashlib.sha256(data).hexdigest() == held_sha, started)
                started = time.monotonic()
                check("held dir", sorted(os.listdir(held_dir)) == dir_names, started)
            except OSError as ex:
                stats["errors"] += 1
                stats["messages"].append(f"{path}: {ex}")
            if len(stats["messages"]) > 50:
                stats["messages"] = stats["messages"][:50]
    os.close(held)
    os.close(held_dir)
    with open(result_path, "w") as f:
        json.dump(stats, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
