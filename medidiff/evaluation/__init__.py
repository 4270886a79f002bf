"""medidiff.evaluation: fastMRI-convention metrics and method comparison tables."""

from medidiff.metrics import all_metrics, hfen, nmse, psnr, ssim

__all__ = ["all_metrics", "hfen", "nmse", "psnr", "ssim"]
