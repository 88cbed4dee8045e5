"""Train one stage: python tools/train.py --config projects/digits/convnet.yaml [--stage float] [key=value ...]"""
import sys

from hat.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
