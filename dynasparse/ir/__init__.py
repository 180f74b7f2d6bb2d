"""The dynasparse IR: capture, the op set, and graph analysis."""
