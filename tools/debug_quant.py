"""Where does a quantized model lose accuracy: python tools/debug_quant.py all|summary|similarity|sensitivity
--config projects/digits/convnet.yaml [--ckpt PATH] [--precision int16|float] [overrides]"""
import sys

from hat.debug.cli import debug_quant_main

if __name__ == "__main__":
    sys.exit(debug_quant_main())
