"""Export a stage's model to ONNX: python tools/export_onnx.py --config X --stage float|qat|int_infer [--out F]"""
import sys

from hat.cli import export_onnx_main

if __name__ == "__main__":
    sys.exit(export_onnx_main())
