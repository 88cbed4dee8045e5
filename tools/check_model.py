"""Deployability report: python tools/check_model.py --config projects/digits/convnet.yaml [--ckpt PATH] [--export F]"""
import sys

from hat.cli import check_model_main

if __name__ == "__main__":
    sys.exit(check_model_main())
