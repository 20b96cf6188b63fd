"""
Events out.
"""
