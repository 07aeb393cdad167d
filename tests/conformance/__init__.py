"""The conformance battery: guarantees every optimizer of :mod:`lightning_soaa.registry` must keep.

Every test here is parametrized over ``registry.REGISTRY`` (torch's ``@optims(optim_db)`` idea): a new
optimizer gets the whole battery by adding its registry entry, and a new guarantee is written once.
Shared pieces (the tiny model, the data, state comparison, fault injection) are in :mod:`._battery`.
"""
