"""The subcommands of the ``seqvision`` command line: each module parses its arguments (``build_parser``) and
calls the library (``run``). The library never imports this package."""
