"""End-to-end gRPC benchmark of a served bundle and its peers: the stand-alone CLI of
`recstack.bench_e2e` (which `recstack bench all` runs as one of its sections).

    .venv/bin/python tools/bench_e2e.py --artifacts /tmp/e2e-bench/artifacts --data /tmp/lead/large \
        --out /tmp/e2e --scratch /tmp/e2e/load --teacher-onnx /tmp/recstack-bench/teacher.onnx --gmv-users 100
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recstack.bench_e2e import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
