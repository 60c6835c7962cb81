"""Pure domain rules: no I/O, no framework. Table-driven tests live in ``tests/unit/shared/domain``."""
