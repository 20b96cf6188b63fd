"""
Sites and their supervisor.
"""
