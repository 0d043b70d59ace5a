"""lightning-methods: research techniques as drop-in LightningModules and Callbacks.

Members are imported on first use, so ``import lightning_methods`` is cheap and never imports transformers,
opacus or faiss; a technique with a broken optional dependency does not break the others.
"""

from lightning_methods._utils import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "ClassifierModule": ".classifier",
    "nets": ".nets",
    "PauseTokenLM": ".pause_lm",
    "DPSGDFModule": ".dpsgd_f",
    "DistillationModule": ".distillation",
    "distillation": ".distillation",
    "distillation_diagnostics": ".distillation_diagnostics",
    "supervision_complexity": ".distillation_diagnostics",
    "exaggeration_slope": ".distillation_diagnostics",
    "MixupConsistencyModule": ".mixup_consistency",
    "mixup": ".mixup",
    "ResMem": ".resmem",
    "metrics": ".metrics",
    "WorstClassAccuracy": ".metrics",
    "RiskCoverage": ".metrics",
    "DeferralCurve": ".metrics",
    "SCODRisk": ".metrics",
    "EmbeddingDistillationModule": ".embed_distill",
    "SentenceEncoder": ".embed_distill",
    "SelectiveOODModule": ".selective_ood",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
