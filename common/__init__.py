"""The project's base: user-facing errors (errors.py) and safe output files (files.py); standard library and numpy only."""
