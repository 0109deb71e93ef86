"""Data: the dataset registry (datasets.py), the input pipelines and loaders (loaders.py), RandAugment."""
