"""LightningDataModules of lightning-methods.

Members are imported on first use, so importing this package is cheap and a datamodule with heavy or optional
dependencies (HF ``datasets``, ``tokenizers``) never breaks the others.
"""

from lightning_methods._utils import lazy_exports

_EXPORTS = {
    "ArrayDataModule": "._base",
    "ArrayDataset": "._base",
    "BatchedArrayDataset": "._base",
    "ImageDataModule": "._base",
    "DigitsDataModule": ".vision",
    "MNISTDataModule": ".vision",
    "MNIST1DDataModule": ".vision",
    "TabularDataModule": ".tabular",
    "TextLMDataModule": ".text",
    "PromptTargetDataModule": ".text",
    "SyntheticReasoningDataModule": ".text",
    "CounterexampleDataModule": ".private_features",
    "PretrainedFeaturesDataModule": ".private_features",
    "SemiSupervisedDataModule": ".semi_supervised",
    "RetrievalDataModule": ".retrieval",
    "OODDataModule": ".ood",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
