"""Defaults the CLI shows in its help; kept apart so building the parser imports nothing heavy."""

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DB = "sqlite:///./tether.db"
