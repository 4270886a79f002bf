"""`python -m medidiff` is the same as the `medidiff` command."""

import sys


def run() -> None:
    """The console script: Ctrl-C while the command's libraries import ends like Ctrl-C later (one line,
    exit 130), not with a traceback; :func:`medidiff.cli.main` takes over once they are loaded."""
    try:
        from medidiff.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("stopped (Ctrl-C)\n")
        raise SystemExit(130) from None
    main()


if __name__ == "__main__":
    run()
