"""
The control plane.
"""
