"""PUBLISHED numbers, not measured by this suite: the OFA-KD paper's CIFAR-100 table.

Source: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation",
NeurIPS 2023, CIFAR-100 top-1 (%), students trained from scratch at 224 px, teachers fine-tuned; as transcribed
in the project's method reference (spec section 8.1). ``status``: C = corroborated by a second source, R = recalled,
to be verified against the PDF (see the reference for which cells). Model names are this suite's zoo names.
Kept as text in a module (not a package-data file) so it ships with every install.
"""
from __future__ import annotations

import io

import pandas as pd

SOURCE = "OFA-KD paper (Hao et al., NeurIPS 2023), CIFAR-100 top-1 (%): PUBLISHED numbers, not measured here"

# teacher, student, teacher_top1 (T), student_top1 (S, from scratch), fitnet, crd, kd, dkd, ofa, status
OFA_CIFAR100_CSV = """\
teacher,student,teacher_top1,student_top1,fitnet,crd,kd,dkd,ofa,status
swin_tiny,resnet18,89.26,74.01,78.87,77.63,78.74,80.26,80.54,C
vit_small,resnet18,92.04,74.01,77.71,76.60,77.26,78.10,80.15,C (DKD R)
mixer_b16,resnet18,87.29,74.01,77.15,76.42,77.79,78.67,79.39,R
swin_tiny,mobilenetv2_100,89.26,73.68,74.28,,74.68,71.07,80.98,R
vit_small,mobilenetv2_100,92.04,73.68,73.54,78.14,72.77,69.80,78.45,C
mixer_b16,mobilenetv2_100,87.29,73.68,73.78,,73.33,70.20,78.78,R
convnext_tiny,deit_tiny,88.41,68.00,60.78,65.94,72.99,74.60,75.76,C (DKD R)
mixer_b16,deit_tiny,87.29,68.00,71.05,65.35,71.36,73.44,73.90,R
convnext_tiny,swin_pico,88.41,72.63,24.06,67.09,76.44,76.80,78.32,C (FitNet/KD); rest R
mixer_b16,swin_pico,87.29,72.63,75.20,67.03,75.93,76.39,78.93,R
convnext_tiny,resmlp_12,88.41,66.56,45.47,63.35,72.25,73.22,81.22,C
swin_tiny,resmlp_12,89.26,66.56,63.12,61.68,71.89,72.82,80.63,R
"""


def ofa_cifar100() -> pd.DataFrame:
    """The published OFA CIFAR-100 table (one row per teacher -> student pair)."""
    df = pd.read_csv(io.StringIO(OFA_CIFAR100_CSV))
    df["source"] = SOURCE
    return df
