"""Rewrite docs/ops.md from the operator table: python tools/ops_doc.py [--check]"""
import sys

from hat.cli import ops_doc_main

if __name__ == "__main__":
    sys.exit(ops_doc_main())
