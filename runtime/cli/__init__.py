"""The `diptych` command line (entry point: diptych.cli.main:main)."""
