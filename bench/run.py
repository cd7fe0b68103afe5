"""Run every benchmark, each in its own process, and collect their BENCH lines.

    python bench/run.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ["stats_overhead.py", "miner_attention.py", "logit_lens_time.py", "logit_lens_memory.py", "patching_sweep.py", "generate.py"]
# full runs only: real image lengths, and the statistics at LLaVA-7B's widths
LONG = [["patching_sweep.py", "--shape", "next"], ["stats_overhead.py", "--shapes", "wide7b"]]

quick = "--quick" in sys.argv[1:]
lines = []
runs = [[script, "--quick"] if quick else [script] for script in SCRIPTS] + ([] if quick else LONG)
for script, *options in runs:
    print(f"== {' '.join([script, *options])}", flush=True)
    args = [sys.executable, str(HERE / script), *options]
    result = subprocess.run(args, cwd=HERE, capture_output=True, text=True)
    print(result.stdout, end="")
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        sys.exit(f"{script} failed with exit code {result.returncode}")
    lines += [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
print("\n".join(["== summary", *lines]))
