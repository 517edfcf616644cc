"""Entry point for ``python -m mlxman``."""

from mlxman.cli.app import main

if __name__ == "__main__":
    main()
