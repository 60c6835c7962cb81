"""Developer tooling: the launcher (``vrs run``), the demo seed, the local PostgreSQL/Kafka harness and the
benchmarks. Never part of the runtime package or the image; importable from a checkout (``make`` puts the
checkout on the virtualenv's path)."""
