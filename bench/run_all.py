"""Run every benchmark in bench/ and print their figures (``make bench``)."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_server.py", "bench_localize.py", "bench_index.py"]  # bench_index.py: build only by default

if __name__ == "__main__":
    failed = 0
    for name in BENCHES:
        print(f"== {name}", flush=True)
        failed += subprocess.call([sys.executable, str(HERE / name), *sys.argv[1:]], cwd=HERE.parent) != 0
    sys.exit(1 if failed else 0)
