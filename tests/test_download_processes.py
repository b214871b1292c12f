"""download_data.py's processes, its own and those img2dataset spawns (pool workers, logger), run without torch:
img2dataset reaches it only through webdataset's optional torch shims and no download step uses it. Each such
process then costs ~180 MB and ~3 s of CPU less (benchmarks/bench_download_start.py)."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.image_server import ImageServer  # noqa: F401  (the fixture below builds one)
from tests.test_download_exit_codes import CLI_ARGS, REPO_ROOT, _source, server  # noqa: F401  (fixture)


def test_no_download_process_imports_torch(server, tmp_path):  # noqa: F811
    source = _source(tmp_path, server, ["/img/0.jpg", "/img/1.jpg"])
    # -X importtime: every process (spawned ones inherit the flag) lists each module it imports on stderr
    proc = subprocess.run([sys.executable, "-X", "importtime", "download_data.py", "--source", str(source),
                           "--output", str(tmp_path / "out"), *CLI_ARGS], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", proc.stderr, re.M)
    assert imported.count("img2dataset") >= 2  # once a process: the parent and at least one it spawned
    # (a blocked import is listed too, as torch alone: torch._C is what every real import of torch loads)
    assert "torch._C" not in imported and "torch" in imported
