"""A real S3-compatible server for tests: moto's standalone server, in its own process on a
loopback port it binds itself (port 0) and reports on its first line of output, reached through
s3fs exactly like AWS or MinIO would be.

Credentials reach the code the way they do in production: environment variables
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), the endpoint through AWS_ENDPOINT_URL_S3 (botocore's
service-specific endpoint variable, which s3fs honours). Nothing is passed in code.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from ray_nodes import die_with_parent

# The child binds 127.0.0.1:0, prints the port it got, then serves: no port is probed and reused.
_SERVE = """
import signal, sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("PORT", server.get_host_and_port()[1], flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
server.stop()
"""


class MotoServer:
    """``with MotoServer(log_path) as s3: s3.env`` -> the variables a client needs."""

    def __init__(self, log_path: str):
        self.log_path = log_path
        self.port: int | None = None
        self.endpoint = ""
        # Random per run, so a test can grep the outputs for them and find nothing by chance.
        self.access_key = "AKIATEST" + secrets.token_hex(6).upper()
        self.secret_key = "secret-" + secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None

    @property
    def credentials(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def env(self) -> dict[str, str]:
        return {**self.credentials, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def __enter__(self) -> "MotoServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVE], stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        line = self.proc.stdout.readline().decode()  # blocks until the server is bound (or the child died)
        if not line.startswith("PORT "):
            self.__exit__()
            raise RuntimeError(f"moto server did not start ({line!r}); see {self.log_path}")
        self.port = int(line.split()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                return self
            except urllib.error.HTTPError:
                return self  # it answers
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise TimeoutError(f"moto server not answering on {self.endpoint} after 60 s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()

    def filesystem(self):
        """An s3fs filesystem on this server (not cached: the tests' env may change)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)

    def upload_dir(self, local_dir: str, url: str) -> None:
        fs = self.filesystem()
        bucket = url.removeprefix("s3://").split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for name in sorted(os.listdir(local_dir)):
            fs.put_file(os.path.join(local_dir, name), f"{url.removeprefix('s3://').rstrip('/')}/{name}")


# ---------------------------------------------------------------------------------------------
# Helpers shared by the S3 tests
# ---------------------------------------------------------------------------------------------

SCORE_COLUMNS = ["aesthetic", "pwatermark", "punsafe", "similarity"]


def small_sample_reference(tmp_path_factory, tiny_models) -> dict:
    """The small sample (2 shards x 20) and its curate run on local files, made once per session
    and shared by the S3 and cluster tests (the sample is deterministic). Needs the in-process Ray
    (the ``ray_local`` fixture)."""
    import json

    from conftest import curate_config
    from shardsmith.pipelines.config import CurateConfig

    from shardsmith.jobs.sample_data import make_sample_data
    from shardsmith.pipelines.flows.curate import run_curate

    base = tmp_path_factory.getbasetemp() / "small-sample-reference"
    done = base / "reference.json"
    if done.exists():
        return json.loads(done.read_text())
    sample = make_sample_data(str(base / "sample"), shards=2, per_shard=20, metadata_files=1, metadata_rows=100,
                              max_size=200)
    out = base / "local-run"
    # at curate's default precision, as the CLI runs it is compared with (bf16 on this CPU: a
    # fixed precision on one kind of CPU gives the same bits on every node)
    stats = run_curate(curate_config(sample["images"], out, tiny_models, precision=CurateConfig.precision),
                       log=lambda *a: None)
    ref = {"sample": sample, "output": str(out), "stats": stats}
    done.write_text(json.dumps(ref))
    return ref


def model_flags(models: dict) -> list[str]:
    return ["--clip-model", models["clip_model"], "--clip-pretrained", models["clip_pretrained"],
            "--aesthetic-head", models["aesthetic_head"], "--watermark-head", models["watermark_head"],
            "--nsfw-head", models["nsfw_head"], "--batch-size", "16"]


def s3_scores(fs, prefix: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(fs.glob(f"{prefix}/scores/*.parquet"))
    return pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in files])


def assert_same_scores(a, b) -> None:
    """Same rows, statuses and reasons; scores equal to 1e-6 (the forwards are deterministic)."""
    import numpy as np

    assert a.num_rows == b.num_rows
    for col in ("key", "row", "status", "reason", "error", "original_width", "original_height", "caption"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    for col in SCORE_COLUMNS:
        x = np.array(a.column(col).to_pylist(), dtype=np.float64)
        y = np.array(b.column(col).to_pylist(), dtype=np.float64)
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, equal_nan=True, err_msg=col)


