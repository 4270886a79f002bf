"""medidiff.evaluation"""
