"""Service tests: a real in-process TetherServer on port 0, spoken to over gRPC, once per
backend (SQLite and PostgreSQL), with a FakeClock the tests advance instead of sleeping."""
