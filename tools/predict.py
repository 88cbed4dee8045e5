"""Evaluate a checkpoint: python tools/predict.py --config projects/digits/convnet.yaml --stage float [--ckpt PATH]"""
import sys

from hat.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
