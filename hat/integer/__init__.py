"""The integer rules of the target march: its profile (ranges, multiplier width, table sizes), rounding and
requantize arithmetic, the one integer kernel per op, and look-up tables.

A layer below `hat.quant` (QAT and the quantized modules) and `hat.backend` (the program and its checker): both
import it and run its kernels, so the quantized model and the program cannot disagree; it imports neither.
"""
