"""What this process holds in memory, as the kernel counts it."""


def rss_mb() -> float:
    """This process's resident set size, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")
