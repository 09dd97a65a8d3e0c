"""MiniCanvas harness: peak memory of one erasure (the process' peak resident set, reset before each method)."""
from __future__ import annotations


def peak_rss_reset():
    try:  # Linux: writing 5 resets the peak RSS (VmHWM) of the process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
