"""``python -m flowalign`` (and ``accelerate launch -m flowalign train ...``)."""

from flowalign.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
