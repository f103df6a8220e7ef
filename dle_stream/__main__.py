"""`python -m dle_stream` runs the `dle-stream` command line."""

from dle_stream.cli import app

if __name__ == "__main__":
    app(prog_name="dle-stream")
