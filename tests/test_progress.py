"""Progress: a live bar on a terminal (a real pseudo-terminal here), plain lines in logs; and a
job's log holds our own lines, not the libraries' noise (a real CLI run, stderr not a terminal)."""

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from shardsmith.pipelines.core.progress import Progress, want_bar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("constructor arguments in the object store", "Progress bars disabled",
         "Token authentication is enabled for this Ray cluster", "No pretrained weights loaded",
         "Writing model shards")


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    assert not want_bar(out)
    p = Progress("curate", 100, 2, stream=out, interval=0)
    p.update(rows=40)
    p.update(rows=60, shards=2)
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3
    assert re.fullmatch(r"\[curate\] 100/100 rows \(100%\) \| 2/2 shards committed \| [\d.]+ rows/s \| ETA 00:00",
                        lines[-1]), lines[-1]


def test_bar_has_rows_rate_eta_and_shards():
    out = io.StringIO()
    p = Progress("curate", 300, 3, stream=out, bar=True)
    p.update(rows=100, shards=1, force=True)
    p.close()
    text = out.getvalue()
    last = text.split("\r")[-1].strip()
    assert "\r" in text and "100/300 rows" in last and "1/3 shards committed" in last
    assert "rows/s" in last and "ETA" in last and "|" in last
    out = io.StringIO()  # rows unknown up front: a bar of shards
    p = Progress("augment", None, 4, stream=out, bar=True)
    p.update(rows=8, shards=2, force=True)
    p.close()
    last = out.getvalue().split("\r")[-1].strip()
    assert " 50%" in last and "8 rows" in last and "2/4 shards committed" in last and "rows/s" in last


def test_a_terminal_gets_the_live_bar():
    code = ("import time; from shardsmith.pipelines.core.progress import Progress\n"
            "p = Progress('curate', 30, 3)\n"
            "for i in range(3):\n    p.update(rows=10, shards=1, force=True); time.sleep(0.05)\n"
            "p.close()\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "TERM": "xterm"}
    env.pop("SHARDSMITH_PROGRESS", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: a process whose stderr is a terminal of 120 columns
        fcntl.ioctl(2, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.execvpe(sys.executable, [sys.executable, "-c", code], env)
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "\r" in text and "30/30 rows" in text and "3/3 shards committed" in text, text
    assert "█" in text  # tqdm's bar


def test_a_job_log_has_no_library_noise(tiny_models, sample, tmp_path):
    """A real curate run, as CI would log it: every line is ours; what the libraries print that says
    nothing to the user is gone at its source; the progress lines are plain."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    env.pop("RAY_AUTH_MODE", None)
    m = tiny_models
    r = subprocess.run([sys.executable, "-m", "shardsmith", "curate", sample["images"], str(tmp_path / "out"),
                        "--clip-model", m["clip_model"], "--clip-pretrained", m["clip_pretrained"],
                        "--aesthetic-head", m["aesthetic_head"], "--watermark-head", m["watermark_head"],
                        "--nsfw-head", m["nsfw_head"], "--batch-size", "16", "--no-report", "--embeddings"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    for noise in NOISE:
        assert noise not in log, (noise, log)
    lines = [line for line in log.splitlines() if line.strip()]
    ours = re.compile(r"^(shardsmith curate: |rules: |ray: |\[curate\] |curate summary|shard |-----|\d{5} |TOTAL |"
                      r"dropped by rule|errors by kind|[a-z_]+ +\d+$|[a-z_]+[<>=!]+[\d.]+ +\d+$|outputs in )")
    strangers = [line for line in lines if not ours.match(line)]
    assert not strangers, strangers
    assert any(line.startswith("[curate] ") and "shards committed" in line for line in lines)
