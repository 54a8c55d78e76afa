"""What a benchmark ran on: CPU model and the flags that decide its speed, cores, load, libraries.

Every measurement script records this beside its numbers (the brief: no number without its machine).
Standard library only at import, so a script that never touches torch does not pay for it.

    from machine_info import machine_record
    record = {"machine": machine_record(threads=1), ...}

Run alone, it prints this machine's record as JSON:

    python scripts/machine_info.py [--libraries torch,e3nn]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def _cpuinfo_line(prefix: str) -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith(prefix)), "")
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; ``platform`` where there is none)."""
    return _cpuinfo_line("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU flags that decide bf16 speed (``avx2``, ``avx512*``, ``amx*``), from /proc/cpuinfo."""
    return sorted(f for f in _cpuinfo_line("flags").split() if f == "avx2" or f.startswith(("avx512", "amx")))


def machine_record(threads: int | None = None, *, libraries: tuple[str, ...] = ()) -> dict:
    """CPU model and flags, cores (all and usable by this process), load average, Python, and the
    versions of torch (when imported) and of ``libraries`` (import names)."""
    record = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "cpus_this_process_may_use": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }
    if threads is not None:
        record["threads"] = threads
    torch = sys.modules.get("torch")
    if torch is not None:
        record["torch"] = torch.__version__
        record["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    for name in libraries:
        module = __import__(name)
        record[name] = getattr(module, "__version__", "unknown")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print this machine's benchmark record (CPU model and flags, cores, load) as JSON.")
    p.add_argument("--libraries", default="", help="comma list of modules whose versions to add (e.g. torch,e3nn)")
    args = p.parse_args(argv)
    names = tuple(n for n in args.libraries.split(",") if n)
    for name in names:  # torch imported here is then also described (cpu_capability)
        __import__(name)
    print(json.dumps(machine_record(libraries=names), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
