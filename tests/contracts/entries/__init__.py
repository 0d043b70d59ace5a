"""One file per technique; each registers its entries with ``tests.contracts.registry.register`` when imported."""
