"""
The database.
"""
