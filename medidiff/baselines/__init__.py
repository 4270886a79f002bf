"""medidiff.baselines"""
