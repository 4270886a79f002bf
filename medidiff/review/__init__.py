"""medidiff.review"""
