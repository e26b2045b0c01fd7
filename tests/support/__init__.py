"""What the tests share: tokens, databases, clients, real servers and given data.

Test modules import their helpers from here, never from one another; `conftest.py` holds
the fixtures and builds them from these modules. Nothing here imports a test module.
"""
