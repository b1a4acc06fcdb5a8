"""The ``cpsample`` command line: one module per subcommand, dispatched by ``__main__``."""
