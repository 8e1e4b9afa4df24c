"""Live dashboard over one or more run directories (DESIGN §10).

  python monitor.py runs/demo [gs://bucket/runs/other ...] [--port 8080] [--host 127.0.0.1]

Binds 127.0.0.1 unless --host is given; open it from your machine through a tunnel (the command is printed).
"""

from __future__ import annotations

import argparse

from echo_jax import dashboard


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (local paths or fsspec URLs)")
  parser.add_argument("--port", type=int, default=8080, help="port to listen on (0 picks a free one)")
  parser.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the page")
  args = parser.parse_args()
  try:
    dashboard.serve(args.run_dirs, host=args.host, port=args.port)
  except FileNotFoundError as error:
    parser.error(str(error))


if __name__ == "__main__":
  main()
