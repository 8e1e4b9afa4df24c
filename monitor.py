"""Live dashboard over one or more run directories (DESIGN §10).

  python monitor.py runs/demo [gs://bucket/runs/other ...] [--port 8080] [--host 127.0.0.1]

Binds 127.0.0.1 unless --host is given; open it from your machine through an ssh tunnel, or at a public URL with
cloudflared run on this machine (both commands are printed).
"""

from __future__ import annotations

import argparse

from echo_jax import dashboard


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (local paths or fsspec URLs)")
  parser.add_argument("--port", type=port_number, default=8080, help="port to listen on (0 picks a free one)")
  parser.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the page")
  args = parser.parse_args()
  try:
    dashboard.serve(args.run_dirs, host=args.host, port=args.port)
  except (FileNotFoundError, dashboard.UnreachableRunError) as error:
    parser.exit(2, f"{parser.prog}: error: {error}\n")  # one line: the arguments were fine, their usage is no help
  except OSError as error:  # the bind: the port taken (make demo's dashboard listens on 8080), or no such address
    parser.exit(2, f"{parser.prog}: error: cannot listen on {args.host}:{args.port} ({error.strerror or error}); pass "
                "--port N (0 picks a free one) or another --host\n")


def port_number(text: str) -> int:
  port = int(text)
  if not 0 <= port <= 65535:
    raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535; 0 picks a free one)")
  return port


if __name__ == "__main__":
  main()
