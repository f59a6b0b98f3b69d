"""Run a command the way a hardened pod runs it: as uid 1001, with the whole filesystem read-only except
for the listed writable folders (the pod's volumes).

``run_hardened()`` (called by a test, as root) starts ``unshare --mount`` with this file as the program.
Inside the private mount namespace, as root, this file:

1. makes the interpreter and the checkout reachable for uid 1001 even if an ancestor folder is private
   (e.g. a Python under /root/.pyenv): the private folder is covered by a tmpfs holding only bind mounts of
   the needed entries;
2. bind-mounts each writable folder onto itself, then remounts ``/`` and every other writable mount
   read-only (like ``readOnlyRootFilesystem: true``; /proc, /sys and /dev stay as a container has them);
3. drops to uid/gid 1001 with no supplementary groups, no capabilities and no_new_privs (``setpriv``) and
   executes the command.

Nothing outside the namespace changes; it disappears with the command. Needs root and mount namespaces
(both true on the dev machines and in CI, which run as root).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

# Kernel and device filesystems a container also gets writable; everything else becomes read-only.
_LEAVE_AS_IS = ("/proc", "/sys", "/dev")


def run_hardened(
    command: list[str],
    *,
    writable: list[Path],
    reachable: list[Path],
    env: dict[str, str],
    cwd: Path,
    stash_dir: Path,
    uid: int = 1001,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    spec = {
        "command": command,
        "writable": [str(p) for p in writable],
        "reachable": [str(p) for p in reachable],
        "env": env,
        "cwd": str(cwd),
        "stash_dir": str(stash_dir),
        "uid": uid,
    }
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", sys.executable, __file__, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _other_can_enter(path: Path) -> bool:
    mode = path.stat().st_mode
    return bool(mode & stat.S_IXOTH)


def _make_reachable(targets: list[Path], stash_dir: Path) -> None:
    """Expose ``targets`` through private ancestors (mode without o+x) by covering each such ancestor with a
    tmpfs that contains bind mounts of only the needed children."""
    for round_ in range(16):  # each round fixes the top-most private ancestor; nested ones in later rounds
        private: dict[Path, set[str]] = {}
        for target in targets:
            for ancestor in [*reversed(target.parents), target]:
                if ancestor.is_dir() and not _other_can_enter(ancestor) and ancestor != target:
                    child = target.relative_to(ancestor).parts[0]
                    private.setdefault(ancestor, set()).add(child)
                    break
        if not private:
            return
        for index, (ancestor, children) in enumerate(sorted(private.items())):
            stash = stash_dir / f"private-{round_}-{index}"
            stash.mkdir(parents=True)
            _mount("--bind", str(ancestor), str(stash))
            _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(ancestor))
            for child in sorted(children):
                source = stash / child
                placeholder = ancestor / child
                if source.is_dir():
                    placeholder.mkdir()
                else:
                    placeholder.touch()
                _mount("--bind", str(source), str(placeholder))
    raise RuntimeError(f"could not make {targets} reachable")


def _mount_points() -> list[tuple[str, set[str]]]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount_point = fields[4].encode().decode("unicode_escape")  # \040 etc.
        points.append((mount_point, set(fields[5].split(","))))
    return points


def _lock_down(writable: list[Path]) -> None:
    for folder in writable:
        _mount("--bind", str(folder), str(folder))
    _mount("-o", "remount,bind,ro", "/")
    keep = {str(f) for f in writable}
    for mount_point, options in _mount_points():
        if "rw" not in options or mount_point in keep:
            continue
        if any(mount_point == p or mount_point.startswith(p + "/") for p in _LEAVE_AS_IS):
            continue
        _mount("-o", "remount,bind,ro", mount_point)


def _main(spec: dict) -> None:
    writable = [Path(p) for p in spec["writable"]]
    _make_reachable([Path(p) for p in spec["reachable"]], Path(spec["stash_dir"]))
    _lock_down(writable)
    os.chdir(spec["cwd"])
    uid = str(spec["uid"])
    setpriv = ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "--no-new-privs", "--inh-caps=-all", "--"]
    os.execvpe(setpriv[0], setpriv + spec["command"], spec["env"])


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
