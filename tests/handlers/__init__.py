"""Example transformation handlers used by the Lambda tests.

Referenced as ``handlers.<module>:<function>``.
"""
