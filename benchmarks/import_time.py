"""Start-up cost: ``import kron_transformers``, ``kron-transformers --help`` and the first use of the API.

Each command runs in a fresh interpreter; the commands take turns within every round (interleaved, so a change in
machine load hits all of them alike) and the table gives the median wall time over the rounds, minus the median of
a bare ``python -c pass`` started the same way.

    python benchmarks/import_time.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


COMMANDS = {
    "python -c pass (subtracted)": ["-c", "pass"],
    "import kron_transformers": ["-c", "import kron_transformers"],
    "kron-transformers --help": ["-m", "kron_transformers.cli", "--help"],
    "import transformers; AutoModel (for scale)": ["-c", "from transformers import AutoModel"],
    "kt.compress_model (first use: torch, transformers, the package)": [
        "-c",
        "import kron_transformers as kt; kt.compress_model",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, argv in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, *argv], check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    baseline = statistics.median(next(iter(times.values())))
    print(f"| command | median s over {args.rounds} rounds | minus bare interpreter |")
    print("| --- | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median - baseline:.3f} |")


if __name__ == "__main__":
    main()
