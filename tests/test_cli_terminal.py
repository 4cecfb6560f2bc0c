"""rpq-fx as a Unix tool: a progress bar only on a terminal, quiet when its reader goes away, and a
failure when nothing was converted. Each runs the real command in a subprocess."""

import os
import pty
import subprocess
import sys
import termios
import textwrap

import pytest

from rpq_fx import _progress, cli

MODEL = textwrap.dedent("""
    from torch import nn


    def net():
        return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 600))
""")


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "terminal_models.py"
    path.write_text(MODEL)
    return f"{path}:net"


def rpq_fx_command(*argv, **kwargs):
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-m", "rpq_fx", *map(str, argv)], env=env, timeout=300, **kwargs)


def test_progress_bar_is_drawn_on_a_terminal_and_not_into_a_file(spec, tmp_path):
    leader, follower = pty.openpty()
    termios.tcsetwinsize(follower, (24, 100))  # a new pty is 0 x 0: tqdm would draw a bar 0 columns wide
    try:
        done = rpq_fx_command("convert", spec, "--num-codebooks", "4", "--no-graph", "--out", tmp_path / "tty",
                              stdout=subprocess.PIPE, stderr=follower)
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end is closed: everything was read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0
    assert b"4/4" in drawn and b"100%" in drawn, "the bar is drawn on a terminal"

    log = tmp_path / "stderr.log"
    with log.open("wb") as file:
        done = rpq_fx_command("convert", spec, "--num-codebooks", "4", "--no-graph", "--out", tmp_path / "file",
                              stdout=subprocess.PIPE, stderr=file)
    assert done.returncode == 0
    assert log.read_bytes() == b"", "nothing but the bar would be written to stderr: no bar, no stray lines"


def test_progress_bar_follows_stderr(monkeypatch):
    class Terminal:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, text):
            pass

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Terminal(True))
    assert _progress.draws() and not _progress.progress_bar(total=2, desc="x").disable
    assert _progress.progress_bar(total=2, desc="x", enabled=False).disable
    monkeypatch.setattr(sys, "stderr", Terminal(False))
    assert not _progress.draws() and _progress.progress_bar(total=2, desc="x").disable


def test_a_reader_that_goes_away_ends_the_command_quietly(spec, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["convert", spec, "--num-codebooks", "4", "--quiet", "--no-graph", "--out", str(out)]) == 0
    reader, writer = os.pipe()
    os.close(reader)  # as `| head` does once it has read enough: every write now fails with EPIPE
    try:
        done = rpq_fx_command("report", out / "model.safetensors", stdout=writer, stderr=subprocess.PIPE)
    finally:
        os.close(writer)
    assert done.stderr == b"", "no 'Broken pipe' error and no traceback"
    assert done.returncode == cli.BROKEN_PIPE_STATUS == 141

    shell = subprocess.run(["bash", "-c", 'set -o pipefail; "$0" -m rpq_fx report "$1" --json | head -n 2',
                            sys.executable, str(out / "model.safetensors")], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert shell.stdout.splitlines()[0] == "{" and len(shell.stdout.splitlines()) == 2
    assert shell.stderr == ""


def test_nothing_converted_fails_loudly_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r18"
    assert cli.main(["convert", "timm:resnet18", "--num-codebooks", "7", "--no-graph", "--out", str(out)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rpq-fx: error: converted 0 of 21 weights, so nothing was written (")
    assert "row length 576 is not divisible by num_codebooks=7" in line and "--max-codebook-dim" in line
    assert list(out.iterdir()) == []
