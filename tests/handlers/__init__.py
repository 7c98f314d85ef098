"""Example transformation handlers used by the Lambda tests.

Referenced as ``tests.handlers.<module>:<function>``.
"""
