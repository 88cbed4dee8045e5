"""Can this environment train? python tools/check_env.py [--require-gpu]  (exit 0: yes; 1: no, with what to do)"""
import sys

try:
    from hat.cli import check_env_main
except ImportError as exc:  # FAQ 2.2 Q2: "No module named 'hat'"
    print(f"FAIL  hat          cannot be imported ({exc})\n      fix: in the HAT checkout run `make setup` (or "
          f"`pip install --no-build-isolation -e .` in your environment), then use that environment's python")
    sys.exit(1)

if __name__ == "__main__":
    sys.exit(check_env_main())
