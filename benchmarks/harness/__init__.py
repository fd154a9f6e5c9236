"""What the tests and the benchmarks share: the load clients (load), the fault injector (faults) and the
network-namespace hosts (netns). Tests import only this library of benchmarks/, and nothing here imports tests."""
