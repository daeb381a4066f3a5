"""Command-line entry points: one `main` per command; `adapterkit <command>` and scripts/*.py share them."""
