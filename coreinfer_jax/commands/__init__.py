"""The command-line programs, one module each.

Each module defines its flags and `main`, and `entry()` runs it through
`cli.app.run`. They are installed as `coreinfer-NAME` and run from a checkout
as `python scripts/NAME.py` (both through `cli.launch`). A process imports one
command: flags are absl's process-wide definitions.
"""
