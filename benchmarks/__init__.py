"""tolcli benchmarks: every figure is a ratio against a baseline measured in the same process.

Run ``python -m benchmarks`` (all) or ``python -m benchmarks NAME ...``; ``--list`` shows the names.
"""
