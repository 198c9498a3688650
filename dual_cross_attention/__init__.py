"""dcal: Dual Cross-Attention Learning (Zhu et al., CVPR 2022) for fine-grained visual categorization."""

__version__ = "0.1.0"
