"""Pure domain core: decisions and validation over plain data, no I/O."""
