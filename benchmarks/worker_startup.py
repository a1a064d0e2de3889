"""What a worker's start-up costs with bitsandbytes installed: importing torch, transformers and peft in a
fresh process, as a worker does before its first trial, with bitsandbytes kept out (what a study that does
not quantize does) and let in (peft imports it whenever it is installed), alternately.

    python benchmarks/worker_startup.py --repeats 7

Prints the median and the range of each, and whether the bitsandbytes import left a line in the output (the
note about its optional CPU kernel, which would land in every trial's log).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CODE = """
import time
start = time.perf_counter()
from loratune.model import import_libraries
import_libraries(quantized={quantized})
import sys
print(f"{{time.perf_counter() - start:.3f}} {{sys.modules.get('bitsandbytes') is not None}}")
"""


def once(quantized: bool) -> tuple[float, float, bool, str]:
    """(whole process seconds, import seconds, bitsandbytes imported, what else it printed)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CODE.format(quantized=quantized)], capture_output=True, text=True,
                         check=True)
    wall = time.perf_counter() - start
    imports, loaded = out.stdout.split()
    return wall, float(imports), loaded == "True", out.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    runs: dict[bool, list] = {False: [], True: []}
    for _ in range(args.repeats):
        for quantized in (False, True):
            runs[quantized].append(once(quantized))
    print("| bitsandbytes | imports (median, range) | process (median) | imported | printed |\n|---|---|---|---|---|")
    for quantized, rows in runs.items():
        imports = [r[1] for r in rows]
        print(f"| {'let in (quantized)' if quantized else 'kept out'} | {statistics.median(imports):.2f} s "
              f"({min(imports):.2f}-{max(imports):.2f}) | {statistics.median(r[0] for r in rows):.2f} s | "
              f"{rows[0][2]} | {rows[0][3][:90] or '-'} |")


if __name__ == "__main__":
    main()
