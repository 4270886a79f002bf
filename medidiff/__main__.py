"""`python -m medidiff` is the same as the `medidiff` command."""

from medidiff.cli import main

if __name__ == "__main__":
    main()
