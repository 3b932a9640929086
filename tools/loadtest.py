"""Open-loop load test of a local ranking server: a thin wrapper of `recstack.loadtest`.

    python tools/loadtest.py --target 127.0.0.1:50051 --qps 100 --duration 10 --data data/small --json out.json --plot out.png
    python tools/loadtest.py --target 127.0.0.1:50051 --sweep --p99-bound-ms 50
"""
import sys

from recstack.loadtest import main

if __name__ == "__main__":
    sys.exit(main())
