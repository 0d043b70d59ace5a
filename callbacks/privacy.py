"""Privacy-budget enforcement for differentially private training (DP-SGD, DPSGD-F).

The callback lives in ``lightning_methods._privacy`` (the module adds it itself, and ``lightning_methods`` never
imports ``callbacks``); this is its public home.
"""

from lightning_methods._privacy import PrivacyBudget

__all__ = ["PrivacyBudget"]
