"""
The process.
"""
