from mdparam._convert import main

raise SystemExit(main(prog="python -m export"))
