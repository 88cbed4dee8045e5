"""The local model zoo: python tools/zoo.py register --config X [--name N] | list | remove NAME"""
import sys

from hat.cli import zoo_main

if __name__ == "__main__":
    sys.exit(zoo_main())
