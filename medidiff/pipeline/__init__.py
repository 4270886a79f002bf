"""medidiff.pipeline"""
