"""medidiff.diffusion"""
