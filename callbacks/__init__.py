"""Lightning Callbacks of lightning-methods.

Members are imported on first use, so importing this package is cheap and a callback with heavy or optional
dependencies (opacus) never breaks the others.
"""

from lightning_methods._utils import lazy_exports

_EXPORTS: dict[str, str] = {
    "PrivacyBudget": ".privacy",
    "TeacherTrajectory": ".teacher_trajectory",
    "DistillationDiagnostics": ".distillation_diagnostics",
    "MixupCallback": ".mixup",
    "LinearityCallback": ".linearity",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
