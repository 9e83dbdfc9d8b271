"""iopfd's development tooling: the kernel lab, the benchmarks, the demo and the emulated fault queue."""
