"""Every shell and Python example of README.md runs, as written, in a temporary directory.

Blocks are read from README.md itself (fences ```sh, ```bash, ```console, ```python). A
block that cannot run (it installs packages, needs a LAN, is a fragment of a program) is
marked in the README by an HTML comment on the line before its fence:

    <!-- readme-test: skip REASON -->     not run; the reason is required
    <!-- readme-test: server -->          a node in the foreground: run alone, must become
                                          ready and stop cleanly on SIGTERM

Every other block runs, in README order, in one session: one temporary directory (holding
a copy of nodes/, as a fresh clone does) inside a private network and pid namespace
(``unshare``), so the README's fixed ports (1883-1885, 7101-7103) are the session's own and
every background process it starts ends with it. Shell blocks run under ``bash -e`` and must
exit 0; Python blocks with this interpreter. Each block has a time bound; a ``console``
block's ``$ `` lines are commands and the lines after them the output they must print.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.timeout(240)

RUNNABLE = {"sh", "bash", "shell", "console", "python"}
MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(\w+)\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
BLOCK_TIMEOUT = 60
# What a block must print, by its first line (beyond exiting 0).
EXPECT = {
    "for n in alpha beta gamma": ["alerts/disk 91%", re.compile(r"^alpha\s+up\b", re.M),
                                  re.compile(r"^gamma\s+up\b", re.M)],
    "import asyncio": ["alerts/cpu b'75%' embedded False"],
    "cat > scan.sh": ["scanned https://example.com: no findings"],
}


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mode: str  # "run", "skip", "server"
    reason: str

    @property
    def first(self) -> str:
        return self.text.strip().splitlines()[0]


def readme_blocks(path: Path = REPO / "README.md") -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, lang = fence.group(1), fence.group(2)
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        if lang not in RUNNABLE:
            continue
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous)
        mode, reason = (marker.group(1), marker.group(2)) if marker else ("run", "")
        blocks.append(Block(start + 1, lang, "\n".join(body) + "\n", mode, reason))
    return blocks


def test_every_readme_block_is_run_or_skipped_with_a_reason() -> None:
    blocks = readme_blocks()
    assert blocks, "no runnable blocks found in README.md"
    for block in blocks:
        assert block.mode in {"run", "skip", "server"}, f"README.md:{block.line}: unknown mode {block.mode!r}"
        if block.mode == "skip":
            assert len(block.reason) > 10, f"README.md:{block.line}: a skipped block needs its reason"
    assert sum(b.mode == "run" for b in blocks) >= 4  # the mesh by hand, Python, jobs, acl


def _namespace() -> list[str]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) for a private network namespace")
    probe = subprocess.run(["unshare", "-r", "-n", "-p", "-f", "--mount-proc", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged namespaces unavailable: {probe.stderr.decode().strip()}")
    return ["unshare", "-r", "-n", "-p", "-f", "--mount-proc"]


def _session_dir(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    work = tmp_path / "clone"
    work.mkdir()
    shutil.copytree(REPO / "nodes", work / "nodes")
    (work / "certs").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # `zmesh` on PATH is the code under test, whatever entry script is installed.
    (bin_dir / "zmesh").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m zmesh "$@"\n')
    (bin_dir / "zmesh").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "HOME": str(tmp_path)}
    return work, env


def _console_script(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """A ``console`` block: the commands as a script, and each command with its output."""
    pairs: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        elif pairs and line.strip():
            pairs[-1][1].append(line)
    return "".join(f"{command}\n" for command, _ in pairs), pairs


def _driver(blocks: list[Block], work: Path) -> str:
    """One bash script running the blocks in order, each bounded, results in files."""
    steps = ["ip link set lo up", f"cd {work}"]
    for n, block in enumerate(blocks):
        if block.lang == "python":
            (work / f".block{n}.py").write_text(block.text)
            run = f"python .block{n}.py"
        else:
            console = block.lang == "console"
            (work / f".block{n}.sh").write_text(_console_script(block.text)[0] if console else block.text)
            # A transcript shows each command's output, whatever its exit code (acl check: 1).
            run = f"bash .block{n}.sh" if console else f"bash -e .block{n}.sh"
        steps.append(f"timeout -k 5 {BLOCK_TIMEOUT} {run} > .out{n} 2>&1 < /dev/null; echo $? > .rc{n}")
    return "\n".join(steps) + "\n"


def test_readme_blocks_run_as_written(tmp_path: Path) -> None:
    namespace = _namespace()
    blocks = [b for b in readme_blocks() if b.mode == "run"]
    work, env = _session_dir(tmp_path)
    (work / ".driver.sh").write_text(_driver(blocks, work))
    # The driver is pid 1 of its namespace: when it exits, every node a block left running
    # in the background is killed by the kernel.
    subprocess.run([*namespace, "bash", str(work / ".driver.sh")], env=env, cwd=work,
                   timeout=BLOCK_TIMEOUT * len(blocks) + 30, capture_output=True)
    failures = []
    for n, block in enumerate(blocks):
        rc_file, out = work / f".rc{n}", (work / f".out{n}")
        output = out.read_text(errors="replace") if out.exists() else ""
        rc = rc_file.read_text().strip() if rc_file.exists() else "not run"
        problems = []
        if rc != "0" and not (block.lang == "console" and rc.isdigit() and rc != "124"):
            problems.append(f"exit {rc}" + (" (timed out)" if rc == "124" else ""))
        if "Traceback" in output:
            problems.append("a traceback")
        if "/../" in output:
            problems.append("a path shown un-normalised (nodes/../data)")
        if block.lang == "console":
            for command, expected in _console_script(block.text)[1]:
                for line in expected:
                    if line not in output:
                        problems.append(f"`{command}` did not print {line!r}")
        for expected in next((v for k, v in EXPECT.items() if block.first.startswith(k)), []):
            found = expected.search(output) if isinstance(expected, re.Pattern) else expected in output
            if not found:
                problems.append(f"no {getattr(expected, 'pattern', expected)!r} in the output")
        if problems:
            failures.append(f"README.md:{block.line} ({block.first!r}): {', '.join(problems)}\n{output[-3000:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("block", [b for b in readme_blocks() if b.mode == "server"],
                         ids=lambda b: f"line{b.line}")
def test_readme_server_blocks_start_and_stop(block: Block, tmp_path: Path) -> None:
    """A foreground node: alone in its namespace, with the certificates of "A mesh by hand";
    it must answer on its MQTT port and stop cleanly on SIGTERM."""
    namespace = _namespace()
    work, env = _session_dir(tmp_path)
    mqtt = re.search(r"--mqtt\s+\S+:(\d+)", block.text)
    port = mqtt.group(1) if mqtt else "1883"
    script = work / ".server.sh"
    script.write_text(
        "ip link set lo up\n"
        "for n in alpha beta gamma; do zmesh certs create $n --dir certs > /dev/null; done\n"
        f"bash -e -c {shlex.quote(block.text)} > .server.log 2>&1 &\n"
        "server=$!\n"
        f"zmesh wait -p {port} -W 20 || exit 3\n"
        "kill -TERM $server\n"
        "wait $server\n"
    )
    result = subprocess.run([*namespace, "bash", str(script)], env=env, cwd=work, timeout=60,
                            capture_output=True, text=True)
    log = (work / ".server.log").read_text(errors="replace") if (work / ".server.log").exists() else ""
    assert result.returncode == 0, f"README.md:{block.line}: exit {result.returncode}\n{result.stderr}\n{log}"
    assert "Traceback" not in log, log
