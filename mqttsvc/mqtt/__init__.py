"""
The broker connection.
"""
